#!/usr/bin/env bash
# The fuzz pass: builds tests/fuzz's libFuzzer harnesses with clang,
# AddressSanitizer and UBSan (build-fuzz/), replays every regression input
# in tests/fuzz/regress/HARNESS/, then fuzzes each harness for SECONDS from
# seeds that tests/fuzz/seeds.py writes (small valid files of each format,
# the head of the default model's GGUF when it is cached) with its
# dictionary. Fails on any crash, leak or sanitizer report, and says where
# the input that did it was kept: copy it into tests/fuzz/regress/HARNESS/.
#
#   tests/fuzz/run.sh [SECONDS]        default 20 per harness (CI)
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-20}
command -v clang >/dev/null || { echo "fuzz: clang is needed (Debian's clang package)"; exit 1; }

b=build-fuzz
cmake -S . -B "$b" -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DQS_FUZZ=ON \
    -DQS_WITH_CUDA=OFF -DQS_CUDA_EMU=OFF -DQS_SANITIZE=address,undefined \
    -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_FLAGS_DEBUG="-g -O1" >/dev/null
harnesses=(weights index config checkpoint tokenizer request plan_args)
cmake --build "$b" -j "$(nproc)" --target "${harnesses[@]/#/fuzz_}" >"$b/build.log" 2>&1 ||
    { tail -30 "$b/build.log"; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/qs-fuzz.XXXXXX")
gguf=${QSHARD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qshard}/SmolLM2-135M-Instruct.Q4_1.gguf
python3 tests/fuzz/seeds.py "$work/seeds" "$gguf"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export TMPDIR=$work # the harnesses' own files go with it

dict_of() {
    case $1 in
    weights | checkpoint) echo tests/fuzz/gguf.dict ;;
    index | config) echo tests/fuzz/json.dict ;;
    plan_args) echo tests/fuzz/plan.dict ;;
    *) echo "" ;;
    esac
}

status=0
for h in "${harnesses[@]}"; do
    bin=$b/tests/fuzz/fuzz_$h
    opts=(-rss_limit_mb=2048 -timeout=10 "-artifact_prefix=$work/$h-")
    [ "$h" = plan_args ] && opts+=(-close_fd_mask=3)
    d=$(dict_of "$h")
    [ -n "$d" ] && opts+=("-dict=$d")
    # Regression inputs: each must run clean.
    if [ -d "tests/fuzz/regress/$h" ] && [ -n "$(ls -A "tests/fuzz/regress/$h")" ]; then
        if ! "$bin" "${opts[@]}" tests/fuzz/regress/"$h"/* >"$work/$h.regress.log" 2>&1; then
            echo "fuzz_$h: a regression input fails again:"; tail -30 "$work/$h.regress.log"
            status=1
            continue
        fi
    fi
    mkdir -p "$work/corpus/$h" "$work/seeds/$h"
    rc=0
    "$bin" "${opts[@]}" -max_total_time="$secs" "$work/corpus/$h" "$work/seeds/$h" \
        >"$work/$h.log" 2>&1 || rc=$?
    if [ "$rc" = 77 ]; then
        echo "fuzz_$h: skipped ($(grep -m1 'fuzz_' "$work/$h.log" || true))"
        continue
    fi
    runs=$(awk '/^Done [0-9]+ runs/ { n += $2 } END { print n + 0 }' "$work/$h.log")
    if [ "$rc" != 0 ] || ls "$work/$h-"* >/dev/null 2>&1; then
        echo "fuzz_$h: FAILED after $runs runs; the input is kept in $work ($(ls "$work/$h-"* 2>/dev/null | head -n 1)):"
        grep -E 'ERROR|SUMMARY|#[0-9]+ +in ' "$work/$h.log" | head -20
        status=1
        continue
    fi
    echo "fuzz_$h: $runs runs in ${secs} s, no crash"
done
[ "$status" = 0 ] && rm -rf "$work"
exit "$status"
