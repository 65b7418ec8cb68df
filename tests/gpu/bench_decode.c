/* bench_decode: decode speed of a synthetic model on one GPU through shard/
 * directly (no daemon: the GPU machines have none of its dependencies).
 *
 *   bench_decode [--model opt-175b] [--scheme bcq|rtn|w8a8|fp16] [--bits 3] [--group 128]
 *                [--batch 1,8] [--steps 32] [--prompt 32] [--max-seq 256] [--layers N] [--vocab N]
 * [--json]
 *
 * Loads the preset with synthetic weights made and quantized on the GPU
 * (the host never holds them), prefills `prompt` tokens in each of `batch`
 * sequences, then times `steps` decode steps: at batch 1 qs_model_next (the
 * step's CUDA graph, sampling on the device), at larger batches one
 * qs_model_forward over one token of each sequence (their logits come to
 * the host). Reports the median and p90 of the step times, the device's
 * weight bytes, the device-to-device copy bandwidth measured here
 * (qs_cuda_copy_bandwidth) and the floor they give (weight bytes / that
 * bandwidth), and the ratio of the median to it. Under the CPU execution
 * harness it runs a small model (--layers and --vocab cut the preset) as a
 * check of the driver only: its times
 * are the emulator's, never a GPU's. Exits 77 without a GPU. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qs_collectives.h"
#include "qs_kernels.h"
#include "qs_shard.h"

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int usage(void)
{
    fprintf(stderr, "usage: bench_decode [--model NAME] [--scheme bcq|rtn|w8a8|fp16] [--bits Q] "
                    "[--group G] [--batch B[,B...]] [--steps N] [--prompt N] [--max-seq N] "
                    "[--layers N] [--vocab N] [--json]\n");
    return 2;
}

int main(int argc, char **argv)
{
    const char *model = "opt-175b", *scheme = "bcq", *batches = "1,8";
    int bits = 3, group = 128, steps = 32, prompt = 32, max_seq = 256, json = 0, layers = 0,
        vocab = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--json"))
            json = 1;
        else if (!v)
            return usage();
        else if (!strcmp(a, "--model"))
            model = v, i++;
        else if (!strcmp(a, "--scheme"))
            scheme = v, i++;
        else if (!strcmp(a, "--bits"))
            bits = atoi(v), i++;
        else if (!strcmp(a, "--group"))
            group = atoi(v), i++;
        else if (!strcmp(a, "--batch"))
            batches = v, i++;
        else if (!strcmp(a, "--steps"))
            steps = atoi(v), i++;
        else if (!strcmp(a, "--prompt"))
            prompt = atoi(v), i++;
        else if (!strcmp(a, "--max-seq"))
            max_seq = atoi(v), i++;
        else if (!strcmp(a, "--layers"))
            layers = atoi(v), i++;
        else if (!strcmp(a, "--vocab"))
            vocab = atoi(v), i++;
        else
            return usage();
    }
    if (qs_cuda_device_count() <= 0) {
        printf("SKIP: no GPU: %s\n", qs_errmsg());
        return 77;
    }
    const qs_model_config *pc = qs_preset_find(model);
    if (!pc) {
        fprintf(stderr, "bench_decode: %s\n", qs_errmsg());
        return 2;
    }
    qs_model_config cfg = *pc;
    if (layers > 0 && (uint32_t)layers < cfg.layers)
        cfg.layers = (uint32_t)layers;
    if (vocab > 1 && (uint32_t)vocab < cfg.vocab)
        cfg.vocab = (uint32_t)vocab;
    qs_quant q = {!strcmp(scheme, "fp16")   ? QS_SCHEME_FP16
                  : !strcmp(scheme, "rtn")  ? QS_SCHEME_RTN
                  : !strcmp(scheme, "w8a8") ? QS_SCHEME_W8A8
                                            : QS_SCHEME_BCQ,
                  bits, (uint32_t)group, 0};
    if (q.scheme == QS_SCHEME_FP16)
        q.bits = 16, q.group_size = 0;
    if (q.scheme == QS_SCHEME_W8A8)
        q.bits = 8; /* group: the activation group */
    int maxb = 1;
    for (const char *p = batches; *p; p++)
        if (*p >= '0' && *p <= '9' && atoi(p) > maxb)
            maxb = atoi(p);
    if (steps < 1 || prompt < 1 || prompt + steps > max_seq || maxb > 64) {
        fprintf(stderr, "bench_decode: need prompt + steps <= max-seq and batches <= 64\n");
        return 2;
    }
    qs_comm *comm = NULL;
    qs_model *m = NULL;
    qs_model_opts o = {.quant = q,
                       .seed = 20261122,
                       .max_slots = (uint32_t)maxb,
                       .max_seq = (uint32_t)max_seq,
                       .on_gpu = 1,
                       .gpu = 0};
    double t0 = now_ms();
    int err = qs_comm_init_single(&comm);
    if (!err)
        err = qs_model_init(&cfg, &o, comm, &m);
    if (err) {
        fprintf(stderr, "bench_decode: loading %s: %s\n", model, qs_errmsg());
        return 1;
    }
    double load_s = (now_ms() - t0) / 1e3;
    qs_rank_bytes rb;
    qs_model_bytes(m, &rb);
    double bw = qs_cuda_copy_bandwidth(qs_cuda_emulated() ? (size_t)64 << 20 : (size_t)1 << 30);
    size_t V = cfg.vocab;
    int32_t *tok = malloc((size_t)maxb * (size_t)prompt * sizeof *tok);
    uint32_t *slot = malloc((size_t)maxb * (size_t)prompt * sizeof *slot);
    uint32_t *pos = malloc((size_t)maxb * (size_t)prompt * sizeof *pos);
    float *logits = malloc((size_t)maxb * V * sizeof *logits);
    double *ms = malloc((size_t)steps * sizeof *ms);
    if (json)
        printf("{\"model\": \"%s\", \"scheme\": \"%s\", \"bits\": %d, \"group\": %d, "
               "\"device\": \"%s\", \"load_seconds\": %.1f, \"linear_bytes\": %llu, "
               "\"rank_bytes\": %llu, \"copy_gbs\": %.1f, \"runs\": [",
               model, scheme, q.bits, group, qs_cuda_emulated() ? "cuda-emu" : "cuda", load_s,
               (unsigned long long)rb.linear, (unsigned long long)rb.total, bw);
    else
        printf("%s %s %d-bit g%d: loaded in %.1f s, %.2f GiB of weights on the GPU, copy "
               "bandwidth %.0f GB/s%s\n",
               model, scheme, q.bits, group, load_s, (double)rb.linear / (1 << 30), bw,
               qs_cuda_emulated() ? " (EMULATED: not a GPU's time)" : "");
    int first = 1;
    for (const char *p = batches; *p && !err;) {
        int B = atoi(p);
        while (*p && *p != ',')
            p++;
        if (*p == ',')
            p++;
        if (B < 1)
            continue;
        /* Prefill every sequence, then the timed steps. */
        for (int b = 0; b < B && !err; b++) {
            for (int i = 0; i < prompt; i++)
                tok[i] = (int32_t)((b * 7919 + i * 104729) % V), slot[i] = (uint32_t)b,
                pos[i] = (uint32_t)i;
            err = qs_model_forward(m, (size_t)prompt, tok, slot, pos, (size_t)prompt, NULL);
        }
        qs_sampler s;
        qs_sampler_init(&s, 0, 1, 0, 1);
        int32_t next = 1;
        for (int k = 0; k < steps && !err; k++) {
            for (int b = 0; b < B; b++)
                tok[b] = (int32_t)((next + b) % V), slot[b] = (uint32_t)b,
                pos[b] = (uint32_t)(prompt + k);
            double t1 = now_ms();
            err = B == 1 ? qs_model_next(m, 1, tok, slot, pos, &s, &next)
                         : qs_model_forward(m, (size_t)B, tok, slot, pos, 0, logits);
            ms[k] = now_ms() - t1;
        }
        if (err)
            break;
        /* The first steps include the graph's capture. */
        int skip = steps > 4 ? 2 : 0;
        qsort(ms + skip, (size_t)(steps - skip), sizeof *ms, cmp_d);
        double med = ms[skip + (steps - skip) / 2], p90 = ms[skip + (steps - skip) * 9 / 10];
        double floor_ms = bw > 0 ? (double)rb.linear / (bw * 1e9) * 1e3 : 0;
        if (json)
            printf("%s{\"batch\": %d, \"steps\": %d, \"median_ms\": %.3f, \"p90_ms\": %.3f, "
                   "\"floor_ms\": %.3f, \"vs_floor\": %.2f}",
                   first ? "" : ", ", B, steps - skip, med, p90, floor_ms,
                   floor_ms > 0 ? med / floor_ms : 0);
        else
            printf("batch %2d: %.2f ms/step median, %.2f p90 (%d steps); weight-bytes floor %.2f "
                   "ms: %.2fx\n",
                   B, med, p90, steps - skip, floor_ms, floor_ms > 0 ? med / floor_ms : 0);
        first = 0;
    }
    if (json)
        printf("]}\n");
    if (err)
        fprintf(stderr, "bench_decode: %s\n", qs_errmsg());
    free(tok), free(slot), free(pos), free(logits), free(ms);
    qs_model_close(m);
    qs_comm_close(comm);
    return err ? 1 : 0;
}
