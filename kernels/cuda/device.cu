/* Device discovery. Kept in CUDA C so that every build with nvcc links the
 * CUDA runtime and a machine without a GPU reports why it has none. */
#include "qs_kernels.h"

#include <cuda_runtime.h>

extern "C" int qs_cuda_device_count(void)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        /* 35 (driver older than runtime) and 100 (no device) are the usual
         * answers on a machine without a usable GPU. */
        qs_seterr(QS_ENODEV, "no usable CUDA device: CUDA error %d (%s)", (int)e,
                  cudaGetErrorString(e));
        cudaGetLastError();
        return 0;
    }
    return n;
}

extern "C" int qs_cuda_emulated(void)
{
#ifdef QS_CUDA_EMU
    return 1;
#else
    return 0;
#endif
}
