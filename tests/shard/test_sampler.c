/* The sampler: greedy is the argmax, a seed gives the same draws, top-k and
 * top-p cut where they should, and temperature 1 draws follow the softmax. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

#include "qs_shard.h"

enum { V = 50 };

static void fill(float *l)
{
    for (int i = 0; i < V; i++)
        l[i] = (float)(i % 7) * 0.3f - (float)i * 0.01f;
    l[17] = 3.0f; /* the argmax */
    l[3] = 2.5f;  /* the runner-up */
}

static void test_greedy_and_seeds(void **state)
{
    (void)state;
    float l[V];
    fill(l);
    qs_sampler s, t;
    qs_sampler_init(&s, 0, 1, 0, 1);
    assert_int_equal(qs_sample(&s, l, V), 17);
    qs_sampler_init(&s, 1.0f, 1, 0, 42);
    qs_sampler_init(&t, 1.0f, 1, 0, 42);
    int differs = 0;
    qs_sampler u;
    qs_sampler_init(&u, 1.0f, 1, 0, 43);
    for (int i = 0; i < 200; i++) {
        int32_t a = qs_sample(&s, l, V);
        assert_int_equal(a, qs_sample(&t, l, V));
        differs |= a != qs_sample(&u, l, V);
    }
    assert_true(differs);
}

static void test_top_k_and_top_p(void **state)
{
    (void)state;
    float l[V];
    fill(l);
    qs_sampler s;
    qs_sampler_init(&s, 5.0f, 1, 2, 7); /* hot, but only the two best */
    for (int i = 0; i < 500; i++) {
        int32_t t = qs_sample(&s, l, V);
        assert_true(t == 17 || t == 3);
    }
    qs_sampler_init(&s, 1.0f, 0.01f, 0, 7); /* the nucleus is the argmax alone */
    for (int i = 0; i < 100; i++)
        assert_int_equal(qs_sample(&s, l, V), 17);
}

static void test_draws_follow_softmax(void **state)
{
    (void)state;
    float l[V];
    fill(l);
    double p[V], z = 0;
    for (int i = 0; i < V; i++)
        z += p[i] = exp(l[i] - 3.0);
    int counts[V] = {0};
    qs_sampler s;
    qs_sampler_init(&s, 1.0f, 1, 0, 2026);
    enum { N = 20000 };
    for (int i = 0; i < N; i++)
        counts[qs_sample(&s, l, V)]++;
    /* The two big ones within 5 standard deviations of their expectation. */
    int idx[2] = {17, 3};
    for (int k = 0; k < 2; k++) {
        double q = p[idx[k]] / z, mean = N * q, sd = sqrt(N * q * (1 - q));
        assert_true(fabs(counts[idx[k]] - mean) < 5 * sd);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy_and_seeds),
        cmocka_unit_test(test_top_k_and_top_p),
        cmocka_unit_test(test_draws_follow_softmax),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
