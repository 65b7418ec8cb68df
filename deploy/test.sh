#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what is missing, builds,
# runs ctest; then rebuilds the host code with AddressSanitizer and
# UndefinedBehaviorSanitizer and runs the unit, integration and cuda-emu
# tests again (the CUDA code on the CPU execution harness, docs/cuda-emu.md);
# then fuzzes every parser of outside input for 20 s each (tests/fuzz).
#
#   deploy/test.sh              everything (what CI runs)
#   deploy/test.sh --no-sanitize   skip the sanitizer and fuzz passes
#   deploy/test.sh --sanitize-only only the sanitizer and fuzz passes
# GPU tests skip, saying why, on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

plain=1 sanitize=1
case "${1:-}" in
    --no-sanitize) sanitize=0 ;;
    --sanitize-only) plain=0 ;;
    "") ;;
    *) echo "usage: deploy/test.sh [--no-sanitize|--sanitize-only]" >&2; exit 2 ;;
esac

# --slurm: Slurm and munge too, for the test that runs a real batch job.
bash deploy/setup.sh --slurm
jobs=$(nproc)
# Open MPI refuses root unless told; CI and containers run as root.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

if [ $plain = 1 ]; then
    cmake -S . -B build -DQS_WERROR=ON
    cmake --build build -j "$jobs"
    ctest --test-dir build --output-on-failure -j "$jobs"
fi

if [ $sanitize = 1 ]; then
    # Without nvcc, which does not take the sanitizer flags: the CUDA code
    # runs here as the harness builds it (label cuda-emu), and on a GPU
    # machine under compute-sanitizer (tests/gpu/gpu_session.sh).
    # -O1, as AddressSanitizer's authors advise: checks unchanged, and the
    # quantizers and the emulated GPUs run about 1.5x faster than at -O0.
    cmake -S . -B build-sanitize -DQS_WERROR=ON -DQS_WITH_CUDA=OFF \
        -DQS_SANITIZE=address,undefined -DCMAKE_BUILD_TYPE=Debug \
        -DCMAKE_C_FLAGS_DEBUG="-g -O1" -DCMAKE_CXX_FLAGS_DEBUG="-g -O1"
    cmake --build build-sanitize -j "$jobs"
    export ASAN_OPTIONS=abort_on_error=1:detect_leaks=1
    export LSAN_OPTIONS=suppressions=$PWD/tests/lsan.supp:print_suppressions=0
    export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
    ctest --test-dir build-sanitize --output-on-failure -j "$jobs" -L 'unit|integration|cuda-emu'
    # Every parser of files and messages under libFuzzer (clang, ASan, UBSan).
    bash tests/fuzz/run.sh 20
fi
