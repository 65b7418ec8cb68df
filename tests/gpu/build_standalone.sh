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
mkdir -p "$b/obj" "$b/sobj"
archs=${QS_CUDA_ARCHS:--gencode=arch=compute_90a,code=sm_90a}
jobs=${QS_JOBS:-$(nproc)}
cc=${CC:-$(command -v gcc || command -v cc)}
inc="-I$root/kernels -I$root/kernels/cuda -I$root/tests/kernels"
cflags="-O2 -g -std=c11 -Wall -Wextra -fopenmp $inc"
nvflags="-O2 -std=c++17 $archs $inc -Xcompiler=-Wall,-Wextra -Xptxas=-v"
cuda_inc=$(dirname "$(command -v nvcc)")/../include
scflags="-O2 -g -std=c11 -Wall -Wextra -fopenmp -DQS_HAVE_CUDA=1 -DQS_SHARD_GPU=1 \
  -I$root/tests/gpu/standalone -I$root/shard -I$root/collectives $inc -I$cuda_inc"

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
        echo "$cc $cflags -I$root/shard -c $t -o $b/obj/$(basename "$t").o"
    done
    # shard/ and collectives/ (one rank, NCCL's single-rank path) for
    # bench_decode, against the stand-ins of tests/gpu/standalone for the MPI,
    # OpenBLAS and cJSON this machine lacks.
    for f in "$root"/shard/*.c "$root"/collectives/*.c "$root"/tests/gpu/bench_decode.c; do
        echo "$cc $scflags -c $f -o $b/sobj/$(basename "$f").o"
    done
    echo "$cc $scflags -Wno-unused-parameter -c $root/tests/gpu/standalone/stubs.c -o $b/sobj/stubs.o"
} | xargs -P "$jobs" -I{} sh -c '{}'

lib="$b/libqs_kernels_gpu.a"
rm -f "$lib"
ar rcs "$lib" $(ls "$b"/obj/*.o | grep -v -e 'test_gpu_' -e 'qbench_gpu')
slib="$b/libqs_shard_gpu.a"
rm -f "$slib"
ar rcs "$slib" $(ls "$b"/sobj/*.o | grep -v bench_decode)
libs="-lcublas -lcudart -lgomp -lm"
for t in "$root"/tests/gpu/test_gpu_*.c; do
    n=$(basename "$t" .c)
    nvcc $archs -o "$b/$n" "$b/obj/$n.c.o" "$slib" "$lib" $libs
done
nvcc $archs -o "$b/qbench_gpu" "$b/obj/qbench_gpu.o" "$lib" $libs
# bench_decode needs NCCL (the toolkit's, or NCCL_HOME).
nccl_lib=$(ls "$(dirname "$(command -v nvcc)")"/../lib*/libnccl.so* ${NCCL_HOME:+$NCCL_HOME/lib/libnccl.so*} 2>/dev/null | head -n 1)
if [ -n "$nccl_lib" ]; then
    nvcc $archs -o "$b/bench_decode" "$b/sobj/bench_decode.c.o" "$slib" "$lib" \
        -L"$(dirname "$nccl_lib")" -lnccl $libs
else
    echo "bench_decode: not built (no libnccl found beside nvcc; set NCCL_HOME)"
fi
echo "built in $b: $(cd "$b" && ls test_gpu_* qbench_gpu bench_decode 2>/dev/null | tr '\n' ' ')"
