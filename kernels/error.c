/* Error codes and the per-thread message behind qs_errmsg(). */
#include "qs_kernels.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char errmsg[512];

const char *qs_strerror(int err)
{
    switch (err) {
    case QS_OK:
        return "success";
    case QS_EINVAL:
        return "invalid argument";
    case QS_ENOMEM:
        return "out of memory";
    case QS_EIO:
        return "input/output error";
    case QS_EFORMAT:
        return "malformed data";
    case QS_EOVERFLOW:
        return "size overflow";
    case QS_ENOTSUP:
        return "not supported";
    case QS_ENODEV:
        return "no device";
    case QS_ECOMM:
        return "communication failure";
    case QS_ENOTFOUND:
        return "not found";
    case QS_EEXIST:
        return "already exists";
    case QS_ENOFIT:
        return "does not fit";
    case QS_EBUSY:
        return "busy";
    case QS_EINTERNAL:
        return "internal error";
    case QS_ESTATE:
        return "not in a state to do it";
    default:
        return "unknown error";
    }
}

const char *qs_errmsg(void)
{
    return errmsg;
}

int qs_seterr(int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errmsg, sizeof errmsg, fmt, ap);
    va_end(ap);
    return err;
}

void qs_clearerr(void)
{
    errmsg[0] = '\0';
}
