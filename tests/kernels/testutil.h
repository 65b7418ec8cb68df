/* testutil.h: random inputs and error norms shared by the kernel tests.
 * Every run draws fresh inputs from a time seed (printed, and settable with
 * QS_TEST_SEED=... to replay a failure). */
#ifndef QS_TESTUTIL_H
#define QS_TESTUTIL_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static uint64_t tu_state;

static inline void tu_seed(const char *name)
{
    const char *env = getenv("QS_TEST_SEED");
    uint64_t s = env ? strtoull(env, NULL, 0) : (uint64_t)time(NULL) ^ (uint64_t)clock();
    tu_state = s ? s : 1;
    printf("# %s: seed %llu (replay with QS_TEST_SEED=%llu)\n", name, (unsigned long long)s,
           (unsigned long long)s);
}

static inline uint64_t tu_u64(void) /* splitmix64 */
{
    uint64_t z = (tu_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline double tu_unif(void) /* (0, 1) */
{
    return ((double)(tu_u64() >> 11) + 0.5) / 9007199254740992.0;
}

static inline double tu_gauss(void)
{
    return sqrt(-2 * log(tu_unif())) * cos(6.283185307179586 * tu_unif());
}

/* Student-t with nu degrees of freedom: heavy tails for nu = 3. */
static inline double tu_student(int nu)
{
    double c = 0;
    for (int i = 0; i < nu; i++) {
        double g = tu_gauss();
        c += g * g;
    }
    return tu_gauss() / sqrt(c / nu);
}

static inline void tu_fill_gauss(float *x, size_t n, double sd)
{
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(sd * tu_gauss());
}

/* ||a - b|| / ||b||, in double. */
static inline double tu_rel_l2(const float *a, const double *b, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = a[i] - b[i];
        num += d * d;
        den += b[i] * b[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

#endif
