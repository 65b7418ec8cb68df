#!/bin/sh
# gpu_session.sh: one call on a lent GPU machine does everything the GPU
# kernels need checked and measured (docs/benchmarks.md, "GPU kernels"):
#   build (standalone: gcc + nvcc, sm_90a), the device and its clocks,
#   every GPU test, compute-sanitizer memcheck and racecheck on the LUT
#   and W8A8 kernels, the SASS facts (16-byte loads, HMMA, IMMA, ldmatrix,
#   cp.async, no local memory), then bench_decode (OPT-175B 3-bit decode
#   on this GPU through shard/), qbench_gpu --quick, and the full
#   qbench_gpu --json --sweep.
# Logs go to $OUT (the device tool brings them back); the last lines
# printed are the short summary. Usage (from the repository root):
#   sh tests/gpu/gpu_session.sh            # everything (never run yet; meant to end in 9 min)
#   QS_SKIP_BENCH=1 sh tests/gpu/gpu_session.sh   # correctness only
set -u
export PATH="$PATH:/usr/local/cuda/bin"
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-$root/gpu-session-out}
b=${QS_BUILD:-/tmp/qs-build-gpu}
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv > "$out/gpu.txt" 2>&1
say "gpu: $(tail -1 "$out/gpu.txt")"

if ! sh "$root/tests/gpu/build_standalone.sh" "$b" > "$out/build.log" 2>&1; then
    tail -40 "$out/build.log"
    say "BUILD FAILED (log: build.log)"
    exit 1
fi
cat "$b"/obj/*.ptxas.log > "$out/ptxas.txt" 2>/dev/null
say "build: ok"

fail=0
# Every GPU test the build made (kernels, device forward-pass ops, sampling,
# quantizers), each bounded so that one hang cannot eat the lease.
for t in $(cd "$b" && ls test_gpu_* | sort); do
    timeout 180 "$b/$t" > "$out/$t.log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && fail=1
    say "$t: rc=$rc; $(grep -c '^FAIL' "$out/$t.log") FAIL lines; $(tail -1 "$out/$t.log")"
    grep '^FAIL' "$out/$t.log" | head -5 | tee -a "$summary"
done

# compute-sanitizer: a failure counts; a machine that refuses the tool
# ("Device not supported", no permission for the debugger interface) is
# reported as not run, not as a failure.
sanitize() { # sanitize TOOL LOG TEST [ARGS...]
    tool=$1 log=$2
    shift 2
    compute-sanitizer --tool "$tool" --error-exitcode 1 "$@" > "$out/$log" 2>&1
    rc=$?
    summ=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/$log" | tail -1)
    if [ $rc -ne 0 ] && grep -qiE 'device not supported|not supported on this|insufficient permission|unable to (attach|connect)' "$out/$log"; then
        say "compute-sanitizer $tool ($(basename "$1") $2): NOT RUN, the machine refused the tool: $(grep -iE 'not supported|permission|unable' "$out/$log" | head -1)"
        return
    fi
    [ $rc -ne 0 ] && fail=1
    say "compute-sanitizer $tool ($(basename "$1") $2): rc=$rc; $summ"
}
if command -v compute-sanitizer > /dev/null; then
    sanitize memcheck sanitizer_memcheck.log "$b/test_gpu_lutgemm" --quick
    sanitize racecheck sanitizer_racecheck.log "$b/test_gpu_lutgemm" --quick
    sanitize memcheck sanitizer_baselines.log "$b/test_gpu_baselines"
    sanitize memcheck sanitizer_w8a8.log "$b/test_gpu_w8a8" --quick
    sanitize racecheck sanitizer_w8a8_race.log "$b/test_gpu_w8a8" --quick
else
    say "compute-sanitizer: not found (NOT RUN)"
fi

# SASS: per kernel, counts of the instructions the design relies on.
# (test_gpu_w8a8 for the W8A8 kernels: IMMA, LDSM, LDGSTS = cp.async; a
# kernel linked into both binaries gives the same line twice, kept once.)
for bin in test_gpu_lutgemm test_gpu_w8a8; do
    cuobjdump -sass "$b/$bin" > "$out/sass_$bin.txt" 2>&1
    awk '/Function :/ { f = $3 } f && /HMMA/ { h[f]++ } f && /LDG.E.128/ { g[f]++ } f && /LDS.128/ { s[f]++ }
         f && /(LDL|STL)/ { l[f]++ } f && /LDS/ { a[f]++ } f && /IMMA/ { im[f]++ } f && /LDSM/ { lm[f]++ }
         f && /LDGSTS/ { cp[f]++ } { if (f) seen[f] = 1 }
         END { for (k in seen) printf "%-70s HMMA %4d IMMA %4d LDSM %4d LDGSTS %4d LDG.128 %4d LDS %5d LDS.128 %4d local %3d\n",
               substr(k, 1, 70), h[k], im[k], lm[k], cp[k], g[k], a[k], s[k], l[k] }' "$out/sass_$bin.txt"
done | sort -u > "$out/sass_summary.txt"
say "sass: $(grep -c . "$out/sass_summary.txt") kernels; any local memory: $(awk '$NF > 0' "$out/sass_summary.txt" | wc -l)"

if [ -z "${QS_SKIP_BENCH:-}" ] && [ -x "$b/bench_decode" ]; then
    # OPT-175B at 3 bits on this one GPU, synthetic weights made and quantized
    # on the device (RTN: the same bytes and kernels as BCQ, a faster fit);
    # decode ms/step at batch 1 (the step's CUDA graph) and 8, against the
    # weight-bytes floor at the copy bandwidth measured here. KV cache for
    # 8 x 80 tokens so that the plan fits 78 GiB (qctl plan opt-175b --bits 3
    # --gpus 1 --batch 8 --seq 80).
    timeout 360 "$b/bench_decode" --model opt-175b --scheme rtn --bits 3 --batch 1,8 \
        --max-seq 80 --prompt 16 --steps 48 > "$out/bench_decode.txt" 2>&1
    say "bench_decode opt-175b rtn 3-bit: rc=$?; $(tr '\n' ' ' < "$out/bench_decode.txt" | cut -c1-400)"
fi

if [ -z "${QS_SKIP_BENCH:-}" ]; then
    "$b/qbench_gpu" --quick > "$out/qbench_quick.txt" 2>&1
    say "qbench_gpu --quick: rc=$?"
    "$b/qbench_gpu" --json --sweep > "$out/qbench.json" 2> "$out/qbench.err"
    say "qbench_gpu --json --sweep: rc=$?"
    "$b/qbench_gpu" > "$out/qbench.txt" 2>&1
    say "qbench_gpu: rc=$?"
    cat "$out/qbench_quick.txt"
    grep -E '^(N x K|[0-9]+x[0-9]+ +1 +lut |[0-9]+x[0-9]+ +(8|64) +lut |[0-9]+x[0-9]+ +[0-9]+ +w8a8 )' "$out/qbench.txt"
fi
echo "-----"
cat "$summary"
exit $fail
