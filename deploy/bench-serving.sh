#!/usr/bin/env bash
# Serving speed through the daemon, as a user sees it: a synthetic model in
# fp32, W8A8, 4-bit and 3-bit, on 1 and on 2 ranks of `mpirun -np 2 qdaemon`:
# prefill tokens/s (a 128-token prompt), decode tokens/s, and the share of
# decode time the leader spends in collectives (the all-reduces after the
# row-parallel layers, the logits' all-gather). Medians of 3 generations.
#
#   deploy/bench-serving.sh [MODEL]      default opt-1.3b
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-opt-1.3b}

bash deploy/setup.sh
cmake -S . -B build >/dev/null
cmake --build build -j "$(nproc)" >/dev/null
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
qctl=build/ctl/qctl

work=$(mktemp -d)
mpirun -np 2 --oversubscribe build/daemon/qdaemon --listen 127.0.0.1:0 \
    --address-file "$work/addr" --device-memory 10GiB >"$work/qdaemon.log" 2>&1 &
daemon=$!
trap '$qctl shutdown >/dev/null 2>&1 || kill $daemon; wait $daemon || true; rm -rf "$work"' EXIT
for _ in $(seq 300); do [ -s "$work/addr" ] && break; sleep 0.1; done
export QSHARD_ADDR
QSHARD_ADDR=$(cat "$work/addr")

# 128 prompt bytes: a synthetic model takes bytes as token ids.
prompt=$(printf 'qshard %.0s' $(seq 19) | head -c 128)
echo "model $model (synthetic weights), prompt 128 tokens, 32 new tokens, greedy, median of 3"
printf '%-10s %4s %14s %14s %12s\n' scheme tp "prefill tok/s" "decode tok/s" "collectives"
# label|load options (fp16 weights are fp32 on CPU ranks)
for c in "fp32|--scheme fp16" "w8a8|--scheme w8a8" "rtn4-g128|--scheme rtn --bits 4" \
    "rtn3-g128|--scheme rtn --bits 3"; do
    for tp in 1 2; do
        # shellcheck disable=SC2086
        $qctl load "$model" --name b ${c#*|} --gpus "$tp" --max-seq 256 >/dev/null
        for i in 1 2 3; do
            $qctl --json generate b "$prompt" --max-tokens 32 >"$work/g$i"
        done
        python3 - "$work" "${c%%|*}" "$tp" <<'PY'
import json, statistics, sys
work, name, tp = sys.argv[1:4]
g = [json.load(open(f"{work}/g{i}")) for i in (1, 2, 3)]
pre = statistics.median(x["prompt_tokens"] / x["first_token_seconds"] for x in g)
dec = statistics.median(x["tokens_per_second"] for x in g)
share = statistics.median(x["decode_allreduce_share"] for x in g)
print(f"{name:<10} {tp:>4} {pre:14.1f} {dec:14.2f} {100 * share:11.1f}%")
PY
        $qctl unload b >/dev/null
    done
done
