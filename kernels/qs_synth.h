/* qs_synth.h: the counter-based generator of synthetic weights, shared by
 * the host loader (shard/) and the device fill (qs_cuda_synth_fill): the
 * value at (key, i) is the same whoever computes it, so a split model
 * equals the whole one and a GPU rank can make its slice without the host.
 * Plain C, usable from CUDA (QS_SYNTH_FN marks the functions for nvcc). */
#ifndef QS_SYNTH_H
#define QS_SYNTH_H

#include <math.h>
#include <stdint.h>

/* Device code: nvcc, or the harness's C++ (whose cuda_runtime.h defines __host__); not the
 * C host code of a program that merely links the harness (it sees QS_CUDA_EMU too). */
#if defined(__CUDACC__) || (defined(QS_CUDA_EMU) && defined(__host__))
#define QS_SYNTH_FN static inline __host__ __device__
#else
#define QS_SYNTH_FN static inline
#endif

/* splitmix64's finaliser. */
QS_SYNTH_FN uint64_t qs_synth_mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* A standard normal variate for (key, i) by Box-Muller in double. */
QS_SYNTH_FN float qs_synth_normal(uint64_t key, uint64_t i)
{
    uint64_t a = qs_synth_mix(key ^ qs_synth_mix(2 * i)),
             b = qs_synth_mix(key ^ qs_synth_mix(2 * i + 1));
    double u1 = ((a >> 11) + 1) * (1.0 / 9007199254740993.0),
           u2 = (b >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

enum { QS_SYNTH_WEIGHT = 0, QS_SYNTH_BIAS = 1, QS_SYNTH_NORM = 2 };

/* The synthetic value of a tensor of `kind` at column `col` and flat index
 * i: weights N(0, 0.02), biases N(0, 0.01), norm gains 1 + N(0, 0.05) (20
 * in the first `outliers` columns: the activation outliers SmoothQuant
 * exists for). */
QS_SYNTH_FN float qs_synth_value(uint64_t key, uint64_t i, uint64_t col, int kind,
                                 uint64_t outliers)
{
    if (kind == QS_SYNTH_BIAS)
        return 0.01f * qs_synth_normal(key, i);
    if (kind == QS_SYNTH_NORM)
        return (col < outliers ? 20.0f : 1.0f) + 0.05f * qs_synth_normal(key, i);
    return 0.02f * qs_synth_normal(key, i);
}

#endif
