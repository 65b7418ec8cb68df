/* Stand-ins for the CUDA entry points in a build without nvcc. */
#include "qs_kernels.h"

int qs_cuda_device_count(void)
{
    qs_seterr(QS_ENODEV, "this build of qshard has no CUDA support (nvcc was not found)");
    return 0;
}

int qs_cuda_emulated(void)
{
    return 0;
}
