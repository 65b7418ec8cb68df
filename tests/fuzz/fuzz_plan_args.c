/* fuzz_plan_args: qctl's argument parsing, sizes and numbers included,
 * through `qctl plan` (local: no daemon), and qs_parse_bytes on its own.
 * The input's NUL-separated pieces are the arguments. Run it with
 * -close_fd_mask=3: the plans and usage errors it prints are not what is
 * tested (run.sh does). */
#include "fuzz_util.h"
#include "qs_ctl.h"
#include "qs_shard.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
    char *buf = malloc(n + 1);
    memcpy(buf, data, n);
    buf[n] = '\0';
    uint64_t v;
    qs_parse_bytes(buf, &v);
    char *argv[34] = {"plan"};
    int argc = 1;
    for (char *p = buf; p < buf + n && argc < 33; p += strlen(p) + 1)
        argv[argc++] = p;
    argv[argc] = NULL;
    /* --svg (or any abbreviation getopt_long takes: --sv, --svg=F) would
     * write files; and whatever else might, lands in the harness's own
     * directory. */
    static int moved;
    if (!moved && chdir(fuzz_dir()) == 0)
        moved = 1;
    int svg = 0;
    for (int i = 1; i < argc; i++)
        svg |= strncmp(argv[i], "--sv", 4) == 0;
    if (!svg && moved)
        qs_ctl_plan(argc, argv);
    free(buf);
    return 0;
}
