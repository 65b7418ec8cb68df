/* The rank's CPUs and threads, decided before MPI_Init: which cores this
 * rank computes on, how many OpenMP and OpenBLAS threads it runs there, and
 * how they wait. Environment variables that the OpenMP runtime and OpenBLAS
 * read when they load only take effect in a new process image, so the
 * daemon sets them and re-executes itself once (invisible to the launcher:
 * same pid, same environment otherwise).
 *
 * The cores: the node's CPUs that this process may use are shared out
 * evenly among the node's ranks, in local-rank order, and the rank is
 * pinned to its share with one thread per CPU of it, each thread bound to
 * one CPU (OMP_PROC_BIND). Why not the launcher's default binding: `mpirun
 * -np 1` binds the rank to one core, so its threads would share it, and
 * with `--bind-to none` every rank's threads float over every core. A
 * binding the user chose is kept as the share: mpirun's --bind-to X (other
 * than none), Slurm's --cpus-per-task. OMP_NUM_THREADS, when set, is kept.
 *
 * The waits: OpenMP threads that spin between parallel regions take the
 * core from the rank's MPI progress loop and from other ranks; they spin
 * briefly (GOMP_SPINCOUNT, about 10-50 us) and then sleep, unless
 * OMP_WAIT_POLICY or GOMP_SPINCOUNT say otherwise. */
#define _GNU_SOURCE
#include "qs_daemon.h"

#include <cblas.h>
#include <omp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Spins before an idle OpenMP thread sleeps (libgomp's default is 300000,
 * several milliseconds: long enough to starve a neighbour). */
#define QS_SPINCOUNT "20000"

static int env_int(const char *const *names, size_t n, int dflt)
{
    for (size_t i = 0; i < n; i++) {
        const char *v = getenv(names[i]);
        if (v && *v)
            return atoi(v);
    }
    return dflt;
}

/* This rank's place on its node, from the launcher's environment (Open MPI,
 * MPICH/Hydra, PMIx, Slurm). */
static void local_place(int *rank, int *size)
{
    static const char *const r[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                                    "PMIX_LOCAL_RANK", "SLURM_LOCALID"};
    static const char *const s[] = {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                                    "PMIX_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE",
                                    "SLURM_TASKS_PER_NODE"}; /* "2(x3)": atoi takes the 2 */
    *rank = env_int(r, 4, 0);
    *size = env_int(s, 5, 1);
    if (*size < 1)
        *size = 1;
    if (*rank < 0 || *rank >= *size)
        *rank = 0;
}

/* CPUs of set as "0-3,8" into out. */
static void cpu_list(const cpu_set_t *set, char *out, size_t n)
{
    size_t at = 0;
    out[0] = '\0';
    for (int c = 0; c < CPU_SETSIZE && at < n; c++) {
        if (!CPU_ISSET(c, set))
            continue;
        int e = c;
        while (e + 1 < CPU_SETSIZE && CPU_ISSET(e + 1, set))
            e++;
        int k = e > c ? snprintf(out + at, n - at, "%s%d-%d", at ? "," : "", c, e)
                      : snprintf(out + at, n - at, "%s%d", at ? "," : "", c);
        if (k < 0)
            break;
        at += (size_t)k;
        c = e;
    }
}

/* The CPUs this rank computes on: its share of what the node lets it use. */
static int choose_cpus(cpu_set_t *share, const char **why)
{
    cpu_set_t mask;
    if (sched_getaffinity(0, sizeof mask, &mask) != 0)
        return -1;
    int lrank, lsize;
    local_place(&lrank, &lsize);
    const char *cpt = getenv("SLURM_CPUS_PER_TASK");
    if (getenv("SLURM_JOB_ID") && cpt && *cpt) {
        *share = mask; /* Slurm placed the task on its --cpus-per-task */
        *why = "Slurm's --cpus-per-task";
        return 0;
    }
    /* mpirun --bind-to X given on the command line (or as an MCA
     * parameter): the user placed the rank (a GPU's NUMA domain, say). */
    const char *bind = getenv("OMPI_MCA_hwloc_base_binding_policy");
    if (bind && *bind && strcmp(bind, "none") != 0) {
        *share = mask;
        *why = "mpirun's --bind-to";
        return 0;
    }
    if (!getenv("SLURM_JOB_ID")) {
        /* Whatever the launcher bound us to, ask for every online CPU: the
         * kernel keeps us inside our cgroup's cpuset. */
        cpu_set_t all;
        CPU_ZERO(&all);
        long online = sysconf(_SC_NPROCESSORS_ONLN);
        for (long c = 0; c < online && c < CPU_SETSIZE; c++)
            CPU_SET((int)c, &all);
        if (sched_setaffinity(0, sizeof all, &all) == 0)
            sched_getaffinity(0, sizeof mask, &mask);
    }
    int n = CPU_COUNT(&mask);
    if (n < 1)
        return -1;
    /* Local rank r of L takes CPUs [r n / L, (r + 1) n / L) of the set; at
     * least one (ranks share a CPU when there are more ranks than CPUs). */
    int lo = (int)((long)lrank * n / lsize), hi = (int)((long)(lrank + 1) * n / lsize);
    if (hi <= lo)
        lo = lrank % n, hi = lo + 1;
    CPU_ZERO(share);
    for (int c = 0, i = 0; c < CPU_SETSIZE && i < hi; c++) {
        if (!CPU_ISSET(c, &mask))
            continue;
        if (i >= lo)
            CPU_SET(c, share);
        i++;
    }
    *why = lsize > 1 ? "an even share of the node's CPUs" : "the node's CPUs";
    return 0;
}

/* OpenBLAS 0.3.21 does not know recent Xeons and falls back to its SSE3
 * "Prescott" kernels, 5x slower than its AVX2 or AVX-512 ones; the core type
 * is read when the library loads. */
static int fix_openblas_core(void)
{
    if (getenv("OPENBLAS_CORETYPE") || strcmp(openblas_get_corename(), "Prescott") != 0)
        return 0;
    __builtin_cpu_init();
    const char *core = __builtin_cpu_supports("avx512f") ? "SkylakeX"
                       : __builtin_cpu_supports("avx2")  ? "Haswell"
                                                         : NULL;
    if (!core)
        return 0;
    setenv("OPENBLAS_CORETYPE", core, 1);
    return 1;
}

void qs_threads_setup(char **argv)
{
    if (getenv("QS_THREADS_PLACED"))
        return; /* this is the re-executed image */
    int again = fix_openblas_core();
    cpu_set_t share;
    const char *why = "";
    char desc[512] = "";
    if (choose_cpus(&share, &why) == 0 && sched_setaffinity(0, sizeof share, &share) == 0) {
        char list[256], n[16];
        cpu_list(&share, list, sizeof list);
        snprintf(n, sizeof n, "%d", CPU_COUNT(&share));
        if (!getenv("OMP_NUM_THREADS"))
            setenv("OMP_NUM_THREADS", n, 1);
        if (!getenv("OMP_PROC_BIND"))
            setenv("OMP_PROC_BIND", "close", 1);
        snprintf(desc, sizeof desc, "CPUs %s (%s)", list, why);
        again = 1;
    }
    if (!getenv("OMP_WAIT_POLICY") && !getenv("GOMP_SPINCOUNT")) {
        setenv("GOMP_SPINCOUNT", QS_SPINCOUNT, 1);
        again = 1;
    }
    if (!again)
        return;
    setenv("QS_THREADS_PLACED", desc[0] ? desc : "the launcher's CPUs", 1);
    execv("/proc/self/exe", argv); /* on failure: go on as we are */
}

void qs_threads_init(int rank)
{
    int n = omp_get_max_threads();
    openblas_set_num_threads(n);
    const char *placed = getenv("QS_THREADS_PLACED"), *wait = getenv("OMP_WAIT_POLICY");
    const char *spin = getenv("GOMP_SPINCOUNT");
    char waits[64];
    if (wait)
        snprintf(waits, sizeof waits, "OMP_WAIT_POLICY=%s", wait);
    else
        snprintf(waits, sizeof waits, "spin %s then sleep", spin ? spin : "(libgomp's default)");
    qs_log(QS_LOG_INFO, "rank %d: %d thread(s) on %s, %s; OpenBLAS %s", rank, n,
           placed ? placed : "the launcher's CPUs", waits, openblas_get_corename());
}
