/* qs_emu_api.h (cuda-emu): what a test asks the CPU execution harness.
 * Plain C. A program built against the harness gets reports on stderr as
 * they happen; at exit it fails (status 86) if any report is left that the
 * program did not clear with qs_emu_reset(), so a test whose numbers are
 * right but whose kernel races still fails. QS_EMU_EXIT_ON_REPORT=0 turns
 * that off (for exploring). */
#ifndef QS_EMU_API_H
#define QS_EMU_API_H

#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum qs_emu_kind {
    QS_EMU_RACE,              /* shared memory: conflicting accesses with no barrier between */
    QS_EMU_UNINIT_SHARED,     /* shared memory read before any thread of the block wrote it */
    QS_EMU_UNINIT_GLOBAL,     /* device memory read before anything wrote it */
    QS_EMU_OOB_SHARED,        /* outside every shared array of the block (fatal) */
    QS_EMU_OOB_GLOBAL,        /* outside every live device allocation (fatal) */
    QS_EMU_HOST_POINTER,      /* device code dereferenced host memory (fatal) */
    QS_EMU_MISALIGNED,        /* an access not aligned to its size (fatal) */
    QS_EMU_DIVERGENT_BARRIER, /* threads of a block at different barriers, or one exited (fatal) */
    QS_EMU_DIVERGENT_WARP, /* lanes meet at different collectives, or the caller is not in mask */
    QS_EMU_DEADLOCK,       /* no thread can go on (fatal) */
    QS_EMU_LAUNCH,         /* a launch the hardware refuses (configuration, shared memory) */
    QS_EMU_BAD_MASK,       /* a shuffle read a lane outside its mask */
    QS_EMU_WARP_ARGS,      /* a warp-wide operation (WMMA, mma, ldmatrix) misused (fatal) */
    QS_EMU_TRAP,           /* __trap() or an unsupported operation (fatal) */
    QS_EMU_API,            /* a runtime, cuBLAS or NCCL call with bad arguments */
    QS_EMU_NKINDS
} qs_emu_kind;

/* Reports of a kind since the last reset. */
unsigned long qs_emu_count(qs_emu_kind kind);
unsigned long qs_emu_count_all(void);
/* The text of the most recent report ("" if none). */
const char *qs_emu_last_report(void);
/* Forgets reports and clears a sticky error (a fatal device error makes
 * every later call fail, as on a GPU, until then). */
void qs_emu_reset(void);
/* 1 when the device code was compiled with the access instrumentation (the
 * plain build); 0 under AddressSanitizer, where ASan checks bounds and the
 * race, initialisation and bank checks are off. */
int qs_emu_checks_active(void);
/* Quiet: reports are counted but not printed (the harness's own tests). */
void qs_emu_set_quiet(int quiet);

/* Shared-memory bank model: per kernel, the warp-wide shared accesses of
 * the sampled blocks (the first of each launch unless QS_EMU_BANK_BLOCKS=N)
 * grouped by instruction, and the wavefronts they take on 32 banks of
 * 4 bytes (8-byte accesses in 2 phases of 16 lanes, 16-byte in 4 of 8).
 * ideal is the fewest wavefronts those accesses could take. Counts, not
 * time. */
typedef struct qs_emu_bank_stats {
    uint64_t requests;   /* warp-wide shared load/store instructions */
    uint64_t wavefronts; /* what the bank model says they take */
    uint64_t ideal;      /* with no conflicts */
} qs_emu_bank_stats;
/* Sums over kernels whose name contains `kernel` (NULL: all) since the last
 * reset; returns the number of kernels matched. */
int qs_emu_banks(const char *kernel, qs_emu_bank_stats *loads, qs_emu_bank_stats *stores);
void qs_emu_bank_report(FILE *out);

#ifdef __cplusplus
}
#endif
#endif
