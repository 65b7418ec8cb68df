/* This rank's device: a GPU chosen by local rank, or a CPU device with a
 * memory budget so that everything runs on machines without GPUs. */
#define _POSIX_C_SOURCE 200809L
#include "qs_daemon.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#ifdef QS_HAVE_CUDA
/* Only device naming and memory queries; they belong in kernels/ as a
 * qs_cuda_device_info() once that library offers one. */
#include <cuda_runtime_api.h>
#endif

static int open_cuda(qs_device *dev, int local_rank, int count, const qs_daemon_opts *o)
{
#ifdef QS_HAVE_CUDA
    dev->cuda = 1;
    /* Modulo: right both when every rank sees all of the node's GPUs
     * (mpirun) and when each sees only its own (srun --gpus-per-task=1).
     * Real sharing is detected by PCI bus id across the node (main.c). */
    dev->index = local_rank % count;
    cudaError_t e = cudaSetDevice(dev->index);
    struct cudaDeviceProp p;
    if (e == cudaSuccess)
        e = cudaGetDeviceProperties(&p, dev->index);
    if (e != cudaSuccess)
        return qs_seterr(QS_ENODEV, "cannot use GPU %d: CUDA error %d (%s)", dev->index, (int)e,
                         cudaGetErrorString(e));
    snprintf(dev->name, sizeof dev->name, "%s", p.name);
    if (cudaDeviceGetPCIBusId(dev->pci, (int)sizeof dev->pci, dev->index) != cudaSuccess)
        snprintf(dev->pci, sizeof dev->pci, "gpu%d", dev->index);
    dev->total = p.totalGlobalMem;
    int err = qs_device_refresh(dev);
    if (err)
        return err;
    dev->budget =
        o->device_memory_given && o->device_memory < dev->total ? o->device_memory : dev->total;
    return QS_OK;
#else
    (void)dev, (void)local_rank, (void)count, (void)o;
    return qs_seterr(QS_ENOTSUP, "this build has no CUDA support");
#endif
}

int qs_device_init(qs_device *dev, int local_rank, const qs_daemon_opts *o)
{
    memset(dev, 0, sizeof *dev);
    if (gethostname(dev->hostname, sizeof dev->hostname - 1) != 0)
        snprintf(dev->hostname, sizeof dev->hostname, "unknown");
    int count = qs_cuda_device_count();
    if (count > 0)
        return open_cuda(dev, local_rank, count, o);
    qs_log(QS_LOG_DEBUG, "no GPU (%s): using a CPU device", qs_errmsg());
    dev->cuda = 0;
    dev->index = -1;
    snprintf(dev->name, sizeof dev->name, "cpu");
    dev->total = o->device_memory;
    dev->budget = o->device_memory;
    return qs_device_refresh(dev);
}

int qs_device_refresh(qs_device *dev)
{
#ifdef QS_HAVE_CUDA
    if (dev->cuda) {
        size_t free_b = 0, total_b = 0;
        cudaError_t e = cudaMemGetInfo(&free_b, &total_b);
        if (e != cudaSuccess)
            return qs_seterr(QS_ENODEV, "cannot read the memory of GPU %d: CUDA error %d (%s)",
                             dev->index, (int)e, cudaGetErrorString(e));
        dev->free = free_b;
        return QS_OK;
    }
#endif
    /* A CPU device's memory is its budget; what qshard holds comes off it. */
    dev->free = dev->budget > dev->used ? dev->budget - dev->used : 0;
    return QS_OK;
}
