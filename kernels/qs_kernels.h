/* qs_kernels.h: the public header of kernels/, the bottom library of qshard.
 *
 * It holds the error convention every qshard library uses, the quantized
 * weight formats shared by the CPU and CUDA code, the quantizers and the
 * kernels. Nothing here knows about models, MPI or gRPC.
 */
#ifndef QS_KERNELS_H
#define QS_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Errors -------------------------------------------------------------
 * Every fallible function returns a qs_err: 0 on success, a negative code
 * otherwise. The sentence that says what went wrong and what to do is kept
 * per thread and read with qs_errmsg() right after the failing call.
 */
typedef enum qs_err {
    QS_OK = 0,
    QS_EINVAL = -1,    /* an argument is out of range or inconsistent */
    QS_ENOMEM = -2,    /* an allocation failed */
    QS_EIO = -3,       /* reading or writing a file failed */
    QS_EFORMAT = -4,   /* a file or message is malformed */
    QS_EOVERFLOW = -5, /* a size computation would overflow */
    QS_ENOTSUP = -6,   /* valid, but not supported by this build or device */
    QS_ENODEV = -7,    /* no usable device (e.g. no GPU) */
    QS_ECOMM = -8,     /* a collective or a peer rank failed */
    QS_ENOTFOUND = -9, /* a named thing (model, file, tensor) does not exist */
    QS_EEXIST = -10,   /* the thing already exists */
    QS_ENOFIT = -11,   /* it does not fit in the memory given */
    QS_EBUSY = -12,    /* the resource is in use or shutting down */
    QS_EINTERNAL = -13 /* a bug: an invariant did not hold */
} qs_err;

/* Short fixed name of a code, e.g. "invalid argument". */
const char *qs_strerror(int err);
/* The last message set on this thread (never NULL; "" when none). */
const char *qs_errmsg(void);
/* Sets this thread's message (printf format) and returns err, so that a
 * failing path reads: return qs_seterr(QS_EINVAL, "...", ...); */
int qs_seterr(int err, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void qs_clearerr(void);

/* ---- Devices ------------------------------------------------------------ */

/* Number of usable CUDA devices; 0 when the build has no CUDA or the machine
 * has no GPU (then qs_errmsg() says why, e.g. CUDA error 100). */
int qs_cuda_device_count(void);

#ifdef __cplusplus
}
#endif
#endif /* QS_KERNELS_H */
