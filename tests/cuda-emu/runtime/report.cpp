/* report.cpp: the harness's reports. Each names the kernel, block and
 * thread, and the source lines involved (addr2line on the instrumented
 * code's return addresses). A report of the same kind at the same places
 * is printed once; every one is counted. At exit a program with reports it
 * did not clear (qs_emu_reset) fails with status 86. */
#include "emu_internal.h"

#include <dlfcn.h>
#include <elf.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <map>
#include <set>
#include <tuple>

namespace qs_emu
{

static const char *kind_names[QS_EMU_NKINDS] = {"race",
                                                "uninitialized shared read",
                                                "uninitialized global read",
                                                "shared out of bounds",
                                                "global out of bounds",
                                                "host pointer",
                                                "misaligned access",
                                                "divergent barrier",
                                                "divergent warp collective",
                                                "deadlock",
                                                "launch refused",
                                                "shuffle outside mask",
                                                "warp operation misused",
                                                "trap",
                                                "API misuse"};

static unsigned long g_counts[QS_EMU_NKINDS];
static std::string g_last;
static int g_quiet = -1;
static std::set<std::tuple<int, const void *, const void *>> g_seen;
static std::map<const void *, std::string> g_sym;
static bool g_exit_hooked;

static void at_exit()
{
    unsigned long n = qs_emu_count_all();
    if (!n || env_long("QS_EMU_EXIT_ON_REPORT", 1) == 0)
        return;
    fprintf(stderr, "qs-emu: %lu report(s) left at exit:", n);
    for (int k = 0; k < QS_EMU_NKINDS; k++)
        if (g_counts[k])
            fprintf(stderr, " %lu %s;", g_counts[k], kind_names[k]);
    fprintf(stderr, " failing the program (QS_EMU_EXIT_ON_REPORT=0 to go on)\n");
    fflush(NULL);
    _exit(86);
}

static bool quiet()
{
    if (g_quiet < 0)
        g_quiet = (int)env_long("QS_EMU_QUIET", 0) != 0;
    return g_quiet;
}

static bool exe_is_pie()
{
    static int pie = -1;
    if (pie < 0) {
        pie = 1;
        FILE *f = fopen("/proc/self/exe", "rb");
        Elf64_Ehdr h;
        if (f && fread(&h, sizeof h, 1, f) == 1)
            pie = h.e_type == ET_DYN;
        if (f)
            fclose(f);
    }
    return pie;
}

std::string symbolize(const void *pc)
{
    if (!pc)
        return "?";
    auto it = g_sym.find(pc);
    if (it != g_sym.end())
        return it->second;
    std::string out;
    Dl_info info;
    char cmd[1200];
    uintptr_t addr = (uintptr_t)pc - 1; /* inside the call */
    if (dladdr(pc, &info)) {
        /* The main program shows as "" or argv[0]: name it by /proc/self/exe. */
        char self[1024] = "", real[4096] = "";
        ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
        self[n > 0 ? n : 0] = 0;
        const char *fname = info.dli_fname ? info.dli_fname : "";
        bool is_self = !*fname || (realpath(fname, real) && !strcmp(real, self));
        const char *file = is_self ? self : fname;
        uintptr_t off = !is_self || exe_is_pie() ? addr - (uintptr_t)info.dli_fbase : addr;
        snprintf(cmd, sizeof cmd, "addr2line -f -C -e '%s' 0x%lx 2>/dev/null", file,
                 (unsigned long)off);
        FILE *p = popen(cmd, "r");
        char fn[512] = "", loc[512] = "";
        if (p) {
            if (fgets(fn, sizeof fn, p) && fgets(loc, sizeof loc, p)) {
                fn[strcspn(fn, "\n")] = 0, loc[strcspn(loc, "\n")] = 0;
                char *disc = strstr(loc, " (discriminator");
                if (disc)
                    *disc = 0;
                const char *base = strrchr(loc, '/');
                char *paren = strchr(fn, '(');
                if (paren && paren > fn)
                    *paren = 0; /* the function without its parameter list */
                out = std::string(base ? base + 1 : loc) + " in " + fn;
            }
            pclose(p);
        }
    }
    if (out.empty() || out[0] == '?') {
        char b[64];
        snprintf(b, sizeof b, "pc %p", pc);
        out = b;
    }
    g_sym[pc] = out;
    return out;
}

std::string where()
{
    block_run *b = g_block;
    if (!b)
        return "host";
    char s[512];
    /* The instantiation's own name (mma_kernel<16, 128, 4>), not the launch's text. */
    std::string fn = symbolize((const char *)b->d->fn + 1);
    size_t in = fn.find(" in ");
    fn = in == std::string::npos ? std::string(b->d->name) : fn.substr(in + 4);
    int n = snprintf(s, sizeof s, "kernel %s launched at %s:%d, block (%u,%u,%u)", fn.c_str(),
                     b->d->file, b->d->line, g_block_idx.x, g_block_idx.y, g_block_idx.z);
    if (g_cur && n > 0 && (size_t)n < sizeof s)
        snprintf(s + n, sizeof s - (size_t)n, ", thread (%u,%u,%u)", g_cur->idx.x, g_cur->idx.y,
                 g_cur->idx.z);
    return s;
}

bool report_once(qs_emu_kind kind, const void *pc_a, const void *pc_b)
{
    g_counts[kind]++;
    return g_seen.insert(std::make_tuple((int)kind, pc_a, pc_b)).second;
}

static void emit(qs_emu_kind kind, const char *msg)
{
    if (!g_exit_hooked) {
        atexit(at_exit);
        g_exit_hooked = true;
    }
    g_last = std::string(kind_names[kind]) + ": " + msg;
    if (!quiet())
        fprintf(stderr, "qs-emu: %s: %s\n    in %s\n", kind_names[kind], msg, where().c_str());
}

/* Counted by report_once already for the kinds that deduplicate. */
static bool dedup_kind(qs_emu_kind k)
{
    return k == QS_EMU_RACE || k == QS_EMU_UNINIT_SHARED || k == QS_EMU_UNINIT_GLOBAL;
}

void vreport(qs_emu_kind kind, const char *fmt, va_list ap)
{
    char msg[4096];
    vsnprintf(msg, sizeof msg, fmt, ap);
    if (!dedup_kind(kind))
        g_counts[kind]++;
    emit(kind, msg);
}

void report_msg(qs_emu_kind kind, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vreport(kind, fmt, ap);
    va_end(ap);
}

void report(qs_emu_kind kind, const char *file, int line, const char *fmt, ...)
{
    char msg[3500];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    report_msg(kind, "%s (%s:%d)", msg, file, line);
}

} /* namespace qs_emu */

using namespace qs_emu;

extern "C" unsigned long qs_emu_count(qs_emu_kind kind)
{
    return kind >= 0 && kind < QS_EMU_NKINDS ? g_counts[kind] : 0;
}

extern "C" unsigned long qs_emu_count_all(void)
{
    unsigned long n = 0;
    for (int k = 0; k < QS_EMU_NKINDS; k++)
        n += g_counts[k];
    return n;
}

extern "C" const char *qs_emu_last_report(void)
{
    return g_last.c_str();
}

extern "C" void qs_emu_reset(void)
{
    std::lock_guard<std::recursive_mutex> lk(g_device_lock);
    memset(g_counts, 0, sizeof g_counts);
    g_seen.clear();
    g_last.clear();
    set_sticky(cudaSuccess);
    set_last_error(cudaSuccess);
    for (kernel_info *k : all_kernels())
        memset(k->bank_req, 0, sizeof k->bank_req), memset(k->bank_wave, 0, sizeof k->bank_wave),
            memset(k->bank_ideal, 0, sizeof k->bank_ideal);
}

extern "C" int qs_emu_checks_active(void)
{
    return g_hooks;
}

extern "C" void qs_emu_set_quiet(int q)
{
    g_quiet = q != 0;
}

extern "C" int qs_emu_banks(const char *kernel, qs_emu_bank_stats *loads, qs_emu_bank_stats *stores)
{
    std::lock_guard<std::recursive_mutex> lk(g_device_lock);
    qs_emu_bank_stats z = {0, 0, 0};
    if (loads)
        *loads = z;
    if (stores)
        *stores = z;
    int n = 0;
    for (kernel_info *k : all_kernels()) {
        if (kernel && !strstr(k->name.c_str(), kernel))
            continue;
        n++;
        qs_emu_bank_stats *o[2] = {loads, stores};
        for (int s = 0; s < 2; s++)
            if (o[s])
                o[s]->requests += k->bank_req[s], o[s]->wavefronts += k->bank_wave[s],
                    o[s]->ideal += k->bank_ideal[s];
    }
    return n;
}

extern "C" void qs_emu_bank_report(FILE *out)
{
    std::lock_guard<std::recursive_mutex> lk(g_device_lock);
    fprintf(out, "%-60s %12s %12s %8s %12s %12s %8s\n", "kernel (sampled blocks)", "ld requests",
            "ld wavefr.", "ld ratio", "st requests", "st wavefr.", "st ratio");
    for (kernel_info *k : all_kernels()) {
        if (!k->bank_req[0] && !k->bank_req[1])
            continue;
        double r0 = k->bank_ideal[0] ? (double)k->bank_wave[0] / (double)k->bank_ideal[0] : 0;
        double r1 = k->bank_ideal[1] ? (double)k->bank_wave[1] / (double)k->bank_ideal[1] : 0;
        fprintf(out, "%-60.60s %12llu %12llu %8.2f %12llu %12llu %8.2f\n", k->name.c_str(),
                (unsigned long long)k->bank_req[0], (unsigned long long)k->bank_wave[0], r0,
                (unsigned long long)k->bank_req[1], (unsigned long long)k->bank_wave[1], r1);
    }
}
