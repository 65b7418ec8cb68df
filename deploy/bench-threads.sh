#!/usr/bin/env bash
# Decode speed as a user starts the daemon, against settings chosen by hand:
# the launcher's binding, OpenMP's thread count and wait policy. SmolLM2 at
# bcq 4-bit (synthetic opt-125m when the model cannot be fetched), one
# sequence, 64 new tokens, greedy; the median of 6 generations per launch.
#
#   deploy/bench-threads.sh            every launch below
#   deploy/bench-threads.sh N          only the first N launches
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
cmake -S . -B build >/dev/null
cmake --build build -j "$(nproc)" >/dev/null
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
qctl=build/ctl/qctl
model=smollm2-135m
bash deploy/fetch-model.sh >/dev/null 2>&1 || model=opt-125m

work=$(mktemp -d)
daemon=
stop() {
    [ -n "$daemon" ] || return 0
    QSHARD_ADDR=$(cat "$work/addr" 2>/dev/null) $qctl shutdown >/dev/null 2>&1 || kill "$daemon"
    wait "$daemon" 2>/dev/null || true
    daemon=
}
trap 'stop; rm -rf "$work"' EXIT

# label | environment | mpirun options | ranks (the model on all of them)
launches=(
    "README: mpirun -np 1||-np 1|1"
    "mpirun -np 1 --bind-to none||-np 1 --bind-to none|1"
    "np 1, bind none, OMP_WAIT_POLICY=passive|OMP_WAIT_POLICY=passive|-np 1 --bind-to none|1"
    "np 1, bind none, OMP_WAIT_POLICY=active|OMP_WAIT_POLICY=active|-np 1 --bind-to none|1"
    "np 1, OMP_NUM_THREADS=1|OMP_NUM_THREADS=1|-np 1|1"
    "README: mpirun -np 2||-np 2|2"
    "np 2, bind none, OMP_WAIT_POLICY=passive|OMP_WAIT_POLICY=passive|-np 2 --bind-to none|2"
    "np 2, bind none, OMP_WAIT_POLICY=active|OMP_WAIT_POLICY=active|-np 2 --bind-to none|2"
)
limit=${1:-${#launches[@]}}
echo "$model bcq 4-bit, 64 new tokens, greedy, median of 6 (min..max), $(nproc) cores"
printf '%-44s %16s  %s\n' launch "decode tok/s" "threads (rank 0's log)"
for l in "${launches[@]:0:$limit}"; do
    IFS='|' read -r label env opts ranks <<<"$l"
    rm -f "$work/addr"
    # shellcheck disable=SC2086
    env $env mpirun $opts --oversubscribe build/daemon/qdaemon --listen 127.0.0.1:0 \
        --address-file "$work/addr" --device-memory 4GiB >"$work/log" 2>&1 &
    daemon=$!
    for _ in $(seq 300); do [ -s "$work/addr" ] && break; sleep 0.1; done
    export QSHARD_ADDR
    QSHARD_ADDR=$(cat "$work/addr")
    $qctl load "$model" --scheme bcq --bits 4 --gpus "$ranks" >/dev/null 2>&1
    $qctl generate "$model" "Once upon a time" --max-tokens 8 >/dev/null 2>&1 # warm up
    for i in 1 2 3 4 5 6; do
        $qctl --json generate "$model" "Once upon a time" --max-tokens 64 >"$work/g$i"
    done
    stat=$(python3 - "$work" <<'PY'
import json, statistics, sys
v = sorted(json.load(open(f"{sys.argv[1]}/g{i}"))["tokens_per_second"] for i in range(1, 7))
print(f"{statistics.median(v):6.1f} ({v[0]:.0f}..{v[-1]:.0f})")
PY
)
    threads=$(grep -o 'rank 0: .*then sleep\|rank 0: .*OMP_WAIT_POLICY=[a-z]*' "$work/log" | head -n 1 | sed 's/^rank 0: //')
    printf '%-44s %16s  %s\n' "$label" "$stat" "$threads"
    stop
done
