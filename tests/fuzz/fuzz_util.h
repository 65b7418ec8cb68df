/* fuzz_util.h (tests/fuzz): what the harnesses share. The parsers read
 * files (weights are memory-mapped), so each input is written to a file of
 * the harness's own temporary directory first. */
#ifndef QS_FUZZ_UTIL_H
#define QS_FUZZ_UTIL_H

#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The harness's directory, made once per process. */
static inline const char *fuzz_dir(void)
{
    static char dir[512];
    if (!dir[0]) {
        const char *t = getenv("TMPDIR");
        snprintf(dir, sizeof dir, "%.400s/qs-fuzz-XXXXXX", t && *t ? t : "/tmp");
        if (!mkdtemp(dir))
            abort();
    }
    return dir;
}

/* data[0..n) as DIR/name; the path in out. */
static inline void fuzz_file(const char *name, const uint8_t *data, size_t n, char *out,
                             size_t outn)
{
    snprintf(out, outn, "%s/%s", fuzz_dir(), name);
    FILE *f = fopen(out, "wb");
    if (!f || (n && fwrite(data, 1, n, f) != n) || fclose(f) != 0)
        abort();
}

#endif
