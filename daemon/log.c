/* One line per event on stderr: UTC time, rank, level, message. */
#define _POSIX_C_SOURCE 200809L
#include "qs_daemon.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

static qs_log_level log_level = QS_LOG_INFO;
static int log_rank = -1;

static const char *const level_names[] = {"error", "warn", "info", "debug"};

int qs_log_parse_level(const char *s, qs_log_level *out)
{
    for (int i = 0; i < 4; i++) {
        if (strcmp(s, level_names[i]) == 0) {
            *out = (qs_log_level)i;
            return QS_OK;
        }
    }
    return qs_seterr(QS_EINVAL, "unknown log level '%s': choose error, warn, info or debug", s);
}

void qs_log_init(qs_log_level level, int rank)
{
    log_level = level;
    log_rank = rank;
}

int qs_log_enabled(qs_log_level level)
{
    return level <= log_level;
}

double qs_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

void qs_log(qs_log_level level, const char *fmt, ...)
{
    if (!qs_log_enabled(level))
        return;
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    struct tm tm;
    gmtime_r(&t.tv_sec, &tm);
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    /* One fprintf per line so that lines of the gRPC and main threads (and of
     * the ranks, which mpirun merges) do not interleave mid-line. */
    fprintf(stderr, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ qdaemon[%d] %s: %s\n", tm.tm_year + 1900,
            tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, t.tv_nsec / 1000000,
            log_rank, level_names[level], msg);
}
