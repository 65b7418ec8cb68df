#!/usr/bin/env bash
# Continuous batching through the daemon: `qctl bench-serve` at 1, 4, 16 and
# 64 concurrent streams against `mpirun -np 2 qdaemon`, for SmolLM2-135M at
# bcq 4-bit (the real GGUF, fetched by deploy/fetch-model.sh) and a
# synthetic opt-1.3b in W8A8, both on 2 ranks with room for 64 sequences.
# Each row is the median of REPEATS runs (default 3) of 2 x streams
# requests with 32-word WikiText-2 prompts and 32 output tokens each.
#
#   deploy/bench-batching.sh [REPEATS] [all|smollm2|opt]
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-3}
which=${2:-all}

bash deploy/setup.sh
cmake -S . -B build >/dev/null
cmake --build build -j "$(nproc)" >/dev/null
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
qctl=build/ctl/qctl
gguf=$(bash deploy/fetch-model.sh)
text=../shared/data/wikitext-2-raw/wiki.test.raw

work=$(mktemp -d)
mpirun -np 2 --oversubscribe build/daemon/qdaemon --listen 127.0.0.1:0 \
    --address-file "$work/addr" --device-memory 10GiB >"$work/qdaemon.log" 2>&1 &
daemon=$!
trap '$qctl shutdown >/dev/null 2>&1 || kill $daemon; wait $daemon || true; rm -rf "$work"' EXIT
for _ in $(seq 300); do [ -s "$work/addr" ] && break; sleep 0.1; done
export QSHARD_ADDR
QSHARD_ADDR=$(cat "$work/addr")

echo "2 ranks, max-batch 64, prompts of 32 words, 32 tokens each, 2 x streams requests,"
echo "median of $repeats runs (aggregate output tokens/s; latencies in ms)"
printf '%-22s %7s %12s %8s %9s %9s %9s\n' model streams "tokens/s" "x 1" "TTFT p50" "ITL p50" \
    "ITL p99"
# label|load arguments
for m in "smollm2-135m bcq4|$gguf --scheme bcq --bits 4" \
    "opt-1.3b w8a8 (synth)|opt-1.3b --scheme w8a8 --calib none"; do
    case "$which:${m%% *}" in all:* | smollm2:smollm2-135m | opt:opt-1.3b) ;; *) continue ;; esac
    # shellcheck disable=SC2086
    $qctl load ${m#*|} --name b --gpus 2 --max-seq 256 --max-batch 64 >/dev/null
    base=
    for c in 1 4 16 64; do
        for i in $(seq "$repeats"); do
            $qctl --json bench-serve b --concurrency "$c" --requests $((2 * c)) \
                --max-tokens 32 --prompt-words 32 --prompts "$text" --seed "$i" >"$work/r$i"
        done
        line=$(python3 - "$work" "$repeats" <<'PY'
import json, statistics, sys
runs = [json.load(open(f"{sys.argv[1]}/r{i}")) for i in range(1, int(sys.argv[2]) + 1)]
med = lambda f: statistics.median(f(r) for r in runs)
print(med(lambda r: r["output_tokens_per_second"]), 1e3 * med(lambda r: r["ttft_seconds"]["p50"]),
      1e3 * med(lambda r: r["itl_seconds"]["p50"]), 1e3 * med(lambda r: r["itl_seconds"]["p99"]))
PY
        )
        read -r tps ttft itl50 itl99 <<<"$line"
        base=${base:-$tps}
        printf '%-22s %7d %12.1f %8.2f %9.0f %9.1f %9.1f\n' "${m%%|*}" "$c" "$tps" \
            "$(python3 -c "print($tps / $base)")" "$ttft" "$itl50" "$itl99"
    done
    $qctl unload b >/dev/null
done
