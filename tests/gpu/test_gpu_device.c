/* Smoke test for the CUDA side: a device exists and answers. Skips (77) with
 * the reason where there is no GPU or no CUDA in the build. */
#include "qs_kernels.h"

#include <stdio.h>

int main(void)
{
    int n = qs_cuda_device_count();
    if (n <= 0) {
        printf("SKIP: %s\n", qs_errmsg());
        return 77;
    }
    printf("%d CUDA device(s)\n", n);
    return 0;
}
