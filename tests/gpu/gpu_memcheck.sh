#!/bin/sh
# gpu_memcheck.sh SANITIZER DEVICE_PROBE TEST [ARGS...]: runs TEST under
# compute-sanitizer memcheck; exits 77 (skipped) with the reason when the
# tool is missing or DEVICE_PROBE (test_gpu_device) finds no GPU.
san=$1 probe=$2
shift 2
if [ -z "$san" ] || [ ! -x "$san" ]; then
    echo "SKIP: compute-sanitizer not found (it ships with the CUDA toolkit, bin/)"
    exit 77
fi
if ! out=$("$probe"); then
    echo "$out"
    exit 77
fi
exec "$san" --tool memcheck --leak-check full --error-exitcode 1 "$@"
