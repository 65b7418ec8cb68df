#!/bin/sh
# build_standalone.sh [BUILD_DIR (/tmp/qs-build-gpu)]: builds the kernels library (CPU + CUDA),
# the GPU tests and qbench_gpu with gcc and nvcc alone, without the
# project's other host dependencies (gRPC, MPI, OpenBLAS, cJSON, cmocka),
# which the lent GPU machines do not have. CMake builds the same targets
# where those dependencies exist (docs/benchmarks.md, "GPU kernels").
#   QS_CUDA_ARCHS  nvcc -gencode list (default: sm_90a only, for H100/H200)
#   QS_JOBS        parallel compiles (default: nproc)
#   CC             the C compiler (default: gcc, else cc)
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
b=${1:-/tmp/qs-build-gpu}
mkdir -p "$b/obj"
archs=${QS_CUDA_ARCHS:--gencode=arch=compute_90a,code=sm_90a}
jobs=${QS_JOBS:-$(nproc)}
cc=${CC:-$(command -v gcc || command -v cc)}
inc="-I$root/kernels -I$root/kernels/cuda -I$root/tests/kernels"
cflags="-O2 -g -std=c11 -Wall -Wextra -fopenmp $inc"
nvflags="-O2 -std=c++17 $archs $inc -Xcompiler=-Wall,-Wextra -Xptxas=-v"

# One compile per line, run $jobs at a time; logs kept for the resource report.
{
    for f in "$root"/kernels/error.c "$root"/kernels/cpu/*.c; do
        case $f in */nocuda.c) continue ;; esac
        echo "$cc $cflags -c $f -o $b/obj/$(basename "$f").o"
    done
    for f in "$root"/kernels/cuda/*.cu; do
        case $f in */qbench_gpu.cu) continue ;; esac
        echo "nvcc $nvflags -c $f -o $b/obj/$(basename "$f").o > $b/obj/$(basename "$f").ptxas.log 2>&1 || { cat $b/obj/$(basename "$f").ptxas.log; exit 1; }"
    done
    echo "nvcc -O2 -std=c++17 $archs $inc -c $root/kernels/cuda/qbench_gpu.cu -o $b/obj/qbench_gpu.o"
    for t in "$root"/tests/gpu/test_gpu_*.c; do
        echo "$cc $cflags -c $t -o $b/obj/$(basename "$t").o"
    done
} | xargs -P "$jobs" -I{} sh -c '{}'

lib="$b/libqs_kernels_gpu.a"
rm -f "$lib"
ar rcs "$lib" $(ls "$b"/obj/*.o | grep -v -e 'test_gpu_' -e 'qbench_gpu')
libs="-lcublas -lcudart -lgomp -lm"
for t in "$root"/tests/gpu/test_gpu_*.c; do
    n=$(basename "$t" .c)
    nvcc $archs -o "$b/$n" "$b/obj/$n.c.o" "$lib" $libs
done
nvcc $archs -o "$b/qbench_gpu" "$b/obj/qbench_gpu.o" "$lib" $libs
echo "built in $b: $(cd "$b" && ls test_gpu_* qbench_gpu | tr '\n' ' ')"
