/* Whole files read on the daemon's host with a size limit: calibration and
 * evaluation texts (models.c), TLS material and the access token (auth.c),
 * cache manifests (cache.c). */
#define _POSIX_C_SOURCE 200809L
#include "qs_daemon.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int qs_read_file(const char *path, size_t max, char **out, size_t *len)
{
    *out = NULL;
    if (len)
        *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f)
        return qs_seterr(errno == ENOENT ? QS_ENOTFOUND : QS_EIO,
                         "cannot read '%s' on the daemon's host: %s", path, strerror(errno));
    char *buf = malloc(max + 1);
    size_t n = buf ? fread(buf, 1, max + 1, f) : 0;
    fclose(f);
    if (!buf)
        return qs_seterr(QS_ENOMEM, "out of memory reading '%s'", path);
    if (n > max) {
        free(buf);
        return qs_seterr(QS_EINVAL, "'%s' is larger than %zu bytes, the most it may be", path, max);
    }
    buf[n] = '\0';
    *out = buf;
    if (len)
        *len = n;
    return QS_OK;
}
