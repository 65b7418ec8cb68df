#!/usr/bin/env bash
# qshard against llama.cpp on this machine: the same SmolLM2-135M GGUF
# (deploy/fetch-model.sh's Q4_1 file), the same threads, comparable bits,
# measured one after the other so that both see the same machine:
#
#   bcq 4-bit g96 vs Q4_0 | rtn 3-bit g96 vs Q3_K_S | w8a8 vs Q8_0 | fp16 (fp32 on CPU ranks) vs F32
#
# llama.cpp: llama-bench, 128-token prompt (pp128) and 64 generated tokens
# (tg64), 5 repetitions, its mean and spread. qshard: `mpirun -np 1
# qdaemon` as the README starts it, `qctl generate` of 64 tokens after a
# 128-token prompt, 6 times: decode tokens/s, and prompt tokens over the
# time to the first token for prefill; median and spread.
#
#   deploy/bench-vs-llamacpp.sh LLAMA_BIN [THREADS]
#
# LLAMA_BIN: a directory with llama-bench and llama-quantize (a llama.cpp
# build: `cmake -B build && cmake --build build --target llama-bench
# llama-quantize` in a llama.cpp checkout, or in the vendor/llama.cpp of
# PyPI's llama-cpp-python sdist). qshard never downloads or builds it.
# THREADS (default: all cores) is given to llama.cpp as -t and to qshard as
# OMP_NUM_THREADS. The requantized GGUFs are kept in $QSHARD_CACHE.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:?usage: deploy/bench-vs-llamacpp.sh LLAMA_BIN [THREADS]}
threads=${2:-$(nproc)}
for t in llama-bench llama-quantize; do
    [ -x "$bin/$t" ] || { echo "no $bin/$t: build llama.cpp's $t first (see the comment at the top)"; exit 2; }
done
bash deploy/setup.sh
cmake -S . -B build >/dev/null
cmake --build build -j "$(nproc)" >/dev/null
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
qctl=build/ctl/qctl
src=$(bash deploy/fetch-model.sh)
dir=$(dirname "$src")

# llama.cpp's types, made from the same file (requantized from Q4_1).
declare -A ltype=([bcq4]=Q4_0 [rtn3]=Q3_K_S [w8a8]=Q8_0 [fp32]=F32)
for k in "${!ltype[@]}"; do
    t=${ltype[$k]}
    out=$dir/SmolLM2-135M-Instruct.$t.gguf
    [ -s "$out" ] || "$bin/llama-quantize" --allow-requantize "$src" "$out" "$t" >/dev/null 2>&1
done

work=$(mktemp -d)
daemon=
stop() {
    [ -n "$daemon" ] || return 0
    $qctl shutdown >/dev/null 2>&1 || kill "$daemon"
    wait "$daemon" 2>/dev/null || true
    daemon=
}
trap 'stop; rm -rf "$work"' EXIT
OMP_NUM_THREADS=$threads mpirun -np 1 build/daemon/qdaemon --listen 127.0.0.1:0 \
    --address-file "$work/addr" --device-memory 8GiB >"$work/log" 2>&1 &
daemon=$!
for _ in $(seq 300); do [ -s "$work/addr" ] && break; sleep 0.1; done
export QSHARD_ADDR
QSHARD_ADDR=$(cat "$work/addr")
prompt=$(python3 -c 'print(("The history of the city begins with a small village by the river. " * 20)[:600])')

printf 'SmolLM2-135M, %s threads; tokens/s, median or mean (min..max)\n' "$threads"
printf '%-6s %-8s %20s %20s   %-8s %20s %20s\n' qshard "" prefill decode llama.cpp pp128 tg64
# qshard scheme | load options | llama.cpp key
for c in "bcq4|--scheme bcq --bits 4|bcq4" "rtn3|--scheme rtn --bits 3|rtn3" \
    "w8a8|--scheme w8a8|w8a8" "fp32|--scheme fp16|fp32"; do
    IFS='|' read -r name opts key <<<"$c"
    # shellcheck disable=SC2086
    $qctl load smollm2-135m --name b $opts --max-seq 512 >/dev/null 2>&1
    $qctl generate b "Hello" --max-tokens 8 >/dev/null 2>&1 # warm up
    for i in 1 2 3 4 5 6; do
        $qctl --json generate b "$prompt" --max-tokens 64 >"$work/g$i"
    done
    $qctl unload b >/dev/null
    q=$(python3 - "$work" <<'PY'
import json, statistics, sys
d = [json.load(open(f"{sys.argv[1]}/g{i}")) for i in range(1, 7)]
pre = sorted(x["prompt_tokens"] / x["first_token_seconds"] for x in d)
dec = sorted(x["tokens_per_second"] for x in d)
f = lambda v: f"{statistics.median(v):7.1f} ({v[0]:.0f}..{v[-1]:.0f})"
print(f"{f(pre):>20} {f(dec):>20}")
PY
)
    lt=${ltype[$key]}
    "$bin/llama-bench" -m "$dir/SmolLM2-135M-Instruct.$lt.gguf" -p 128 -n 64 -t "$threads" -r 5 \
        -o json >"$work/l.json" 2>/dev/null
    l=$(python3 - "$work/l.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
out = []
for kind in ("pp", "tg"):
    r = [x for x in rows if (x["n_prompt"] > 0) == (kind == "pp")][0]
    s = r["samples_ts"]
    out.append(f"{r['avg_ts']:7.1f} ({min(s):.0f}..{max(s):.0f})")
print(f"{out[0]:>20} {out[1]:>20}")
PY
)
    printf '%-6s %-8s %s   %-8s %s\n' "$name" "" "$q" "$lt" "$l"
done
