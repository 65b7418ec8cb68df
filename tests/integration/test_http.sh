#!/usr/bin/env bash
# Integration tests of qdaemon --http (ctest label integration).
#   test_http.sh CASE QDAEMON QCTL VENV_DIR MPIEXEC [MPI_FLAGS...]
# metrics: Prometheus text from a live daemon through `promtool check metrics`,
#          /health (200, then 503 while draining), and the errors curl sees.
# openai:  the `openai` package from PyPI (installed into VENV_DIR) streams a
#          chat completion and a completion from SmolLM2 on two ranks.
# Each case starts its own daemon on free ports and cleans up what it started.
set -u
case_name=$1 qdaemon=$2 qctl=$3 venv=$4 mpiexec=$5
shift 5
mpi_flags=("$@")
repo=$(cd "$(dirname "$0")/../.." && pwd)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/qs-http-$case_name.XXXXXX")
log=$tmp/daemon.log
mpirun_pid=
rank_pids=()

note() { printf 'test_http[%s]: %s\n' "$case_name" "$*"; }
fail() {
    note "FAIL: $*"
    if [ -s "$log" ]; then note "daemon log:"; sed 's/^/    /' "$log" | tail -n 60; fi
    exit 1
}
skip() { note "SKIP: $*"; exit 77; }

cleanup() {
    if [ -n "$mpirun_pid" ] && kill -0 "$mpirun_pid" 2>/dev/null; then
        kill -TERM "$mpirun_pid" 2>/dev/null
        for _ in $(seq 30); do kill -0 "$mpirun_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$mpirun_pid" 2>/dev/null
    fi
    for p in "${rank_pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

[ -x "$qdaemon" ] || fail "qdaemon is not built: $qdaemon"
command -v curl >/dev/null || skip "curl is needed (deploy/setup.sh installs it)"
command -v python3 >/dev/null || skip "python3 is needed"

# start [qdaemon options...]: two ranks, gRPC and HTTP on free ports.
start() {
    "$mpiexec" "${mpi_flags[@]}" -np 2 "$qdaemon" --listen 127.0.0.1:0 --http 127.0.0.1:0 \
        --address-file "$tmp/addr" --http-address-file "$tmp/http" --device-memory 2GiB \
        --heartbeat 0.5 --cache-dir "$tmp/qcache" "$@" >"$log" 2>&1 &
    mpirun_pid=$!
    for _ in $(seq 300); do
        [ -s "$tmp/addr" ] && break
        kill -0 "$mpirun_pid" 2>/dev/null || fail "mpirun exited before the daemon was ready"
        sleep 0.1
    done
    [ -s "$tmp/addr" ] || fail "no address file after 30 s"
    export QSHARD_ADDR=$(head -n 1 "$tmp/addr")
    http=http://$(head -n 1 "$tmp/http")
    mapfile -t rank_pids < <("$qctl" stats --json |
        python3 -c 'import json,sys; [print(d["pid"]) for d in json.load(sys.stdin)["devices"]]')
    note "daemon ready: gRPC $QSHARD_ADDR, HTTP $http"
}

# get_status METHOD PATH [BODY]: the HTTP status in $code, the body in $tmp/body.
get_status() {
    local method=$1 path=$2
    shift 2
    code=$(curl -s -o "$tmp/body" -w '%{http_code}' -X "$method" --max-time 60 \
        -H 'Content-Type: application/json' "$@" "$http$path")
}

# expect_error STATUS METHOD PATH BODY WORDS: the status, OpenAI's error shape, the words.
expect_error() {
    local want=$1 method=$2 path=$3 body=$4 words=$5
    get_status "$method" "$path" --data-binary "$body"
    [ "$code" = "$want" ] || fail "$method $path '$body': HTTP $code, want $want: $(cat "$tmp/body")"
    python3 - "$tmp/body" "$words" <<'PY' || fail "$method $path '$body': not OpenAI's error shape: $(cat "$tmp/body")"
import json, sys
e = json.load(open(sys.argv[1]))["error"]
assert set(e) == {"message", "type", "param", "code"}, e
assert e["type"] in ("invalid_request_error", "server_error"), e
assert sys.argv[2].lower() in e["message"].lower(), (sys.argv[2], e["message"])
PY
    note "$want for $method $path: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["error"]["message"])' "$tmp/body")"
}

wait_exit() {
    for _ in $(seq $(($1 * 10))); do
        kill -0 "$mpirun_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$mpirun_pid" 2>/dev/null && { rc=124; return; }
    wait "$mpirun_pid"
    rc=$?
    mpirun_pid=
}

case $case_name in
metrics)
    command -v promtool >/dev/null || skip "promtool is needed (Debian's prometheus package)"
    # Bad --http options: exit 2 with the reason, before MPI starts.
    "$qdaemon" --http 0.0.0.0:0 >"$tmp/out" 2>&1
    [ $? = 2 ] && grep -q -- '--allow-remote' "$tmp/out" || fail "--http 0.0.0.0:0: $(cat "$tmp/out")"
    "$qdaemon" --http 127.0.0.1:http >"$tmp/out" 2>&1
    [ $? = 2 ] && grep -q 'not a port' "$tmp/out" || fail "--http 127.0.0.1:http: $(cat "$tmp/out")"
    "$qdaemon" --http-address-file "$tmp/x" >"$tmp/out" 2>&1
    [ $? = 2 ] && grep -q 'needs --http' "$tmp/out" || fail "--http-address-file alone: $(cat "$tmp/out")"
    "$qdaemon" --help | grep -q -- '--http HOST:PORT' || fail "qdaemon --help does not name --http"
    start --drain-timeout 20
    get_status GET /health
    [ "$code" = 200 ] || fail "/health: $code: $(cat "$tmp/body")"
    "$qctl" load opt-125m --bits 3 --max-seq 64 >/dev/null 2>"$tmp/err" || fail "load: $(cat "$tmp/err")"
    "$qctl" generate opt-125m "Hello" --max-tokens 6 >/dev/null || fail "gRPC generate"
    # Synthetic weights have no tokenizer: completions work (bytes in, ids
    # out), chat is refused; the gRPC and HTTP requests are counted alike.
    get_status POST /v1/completions --data-binary '{"model":"opt-125m","prompt":"Hi","max_tokens":5}'
    [ "$code" = 200 ] || fail "completion on opt-125m: $code: $(cat "$tmp/body")"
    expect_error 400 POST /v1/chat/completions '{"model":"opt-125m","messages":[{"role":"user","content":"hi"}]}' "no chat template"
    get_status GET /metrics
    [ "$code" = 200 ] || fail "/metrics: $code"
    cp "$tmp/body" "$tmp/metrics"
    promtool check metrics <"$tmp/metrics" >"$tmp/lint" 2>&1 || fail "promtool check metrics: $(cat "$tmp/lint")"
    note "promtool check metrics: clean ($(grep -vc '^#' "$tmp/metrics") samples)"
    python3 - "$tmp/metrics" <<'PY' || fail "the metrics: $(grep -v '^#' "$tmp/metrics")"
import re, sys
v = {}
for line in open(sys.argv[1]):
    if line.startswith("#") or not line.strip():
        continue
    name, val = line.rsplit(" ", 1)
    v[name] = float(val)
m = 'model="opt-125m"'
def get(name, labels=m):
    return v[f"{name}{{{labels}}}"]
assert get("qshard_generation_tokens_total") == 6 + 5, v
assert get("qshard_prompt_tokens_total") == 5 + 2, v
assert get("qshard_request_success_total", m + ',finished_reason="length"') == 2, v
assert get("qshard_time_to_first_token_seconds_count") == 2, v
assert get("qshard_inter_token_latency_seconds_count") == 5 + 4, v
assert get("qshard_e2e_request_latency_seconds_count") == 2, v
assert get("qshard_request_queue_time_seconds_count") == 2, v
assert get("qshard_time_to_first_token_seconds_bucket", m + ',le="+Inf"') == 2, v
assert get("qshard_num_requests_running") == 0 and get("qshard_num_requests_waiting") == 0, v
assert 0 <= get("qshard_kv_cache_usage_perc") <= 1, v
assert 0 <= get("qshard_decode_allreduce_share") < 1, v
assert get("qshard_model_load_seconds") > 0 and get("qshard_model_quantize_seconds") > 0, v
assert get("qshard_model_planned_bytes") > 0 and get("qshard_model_allocated_bytes") > 0, v
for r in (0, 1):
    for part in ("weights", "kv_cache", "workspace"):
        assert v[f'qshard_device_memory_used_bytes{{rank="{r}",kind="cpu",part="{part}"}}'] > 0, (r, part)
    assert v[f'qshard_device_memory_free_bytes{{rank="{r}",kind="cpu"}}'] < 2 << 30, r
    assert v[f'qshard_device_memory_total_bytes{{rank="{r}",kind="cpu"}}'] == 2 << 30, r
assert v["qshard_ranks"] == 2, v
PY
    note "counters, histograms and both ranks' memory are there"
    # Errors, in OpenAI's shape and with the right status.
    expect_error 404 POST /v1/completions '{"model":"no-such-model","prompt":"x"}' "not loaded"
    expect_error 400 POST /v1/completions 'not json' "not a JSON object"
    expect_error 400 POST /v1/completions '{"model":"opt-125m","prompt":"x","n":2}' "'n' must be 1"
    expect_error 400 POST /v1/completions '{"model":"opt-125m","prompt":"x","temperature":9}' "temperature"
    expect_error 400 POST /v1/completions '{"model":"opt-125m","prompt":"x","max_tokens":100000}' "max_tokens"
    expect_error 400 POST /v1/completions '{"model":"opt-125m","prompt":"x","max_tokens":500}' "KV cache"
    expect_error 400 POST /v1/completions '{"model":"opt-125m","prompt":"x","stream":true,"max_tokens":500}' "KV cache"
    expect_error 400 POST /v1/completions '{"model":"opt-125m","prompt":[1,2,3]}' "'prompt' must be"
    expect_error 400 POST /v1/completions '{"model":"opt-125m","prompt":"x","stop":["a","b","c","d","e"]}' "stop"
    expect_error 400 POST /v1/completions '{"model":"opt-125m","prompt":"x","logprobs":1}' "not supported"
    expect_error 400 POST /v1/completions '{"model":"opt-125m","prompt":"x","stream_options":{"include_usage":true}}' "stream"
    expect_error 400 POST /v1/chat/completions '{"model":"opt-125m","messages":[]}' "chat template"
    expect_error 405 GET /v1/completions '' "POST"
    expect_error 405 POST /v1/models '{}' "GET"
    expect_error 404 GET /v1/nothing '' "no route"
    expect_error 404 GET /v1/models/no-such-model '' "not loaded"
    head -c 1100000 /dev/zero | tr '\0' a >"$tmp/big"
    get_status POST /v1/completions --data-binary @"$tmp/big"
    [ "$code" = 413 ] || fail "an oversized body: $code: $(head -c 300 "$tmp/body")"
    get_status GET /nowhere
    [ "$code" = 404 ] || fail "GET /nowhere: $code"
    get_status GET /v1/models
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["object"] == "list" and [m["id"] for m in d["data"]] == ["opt-125m"], d' "$tmp/body" ||
        fail "/v1/models: $(cat "$tmp/body")"
    # 12 requests at once, streamed and whole, gRPC among them: queued, each
    # answered in full.
    pids=()
    for i in $(seq 4); do
        curl -s --max-time 60 "$http/v1/completions" -H 'Content-Type: application/json' \
            -d "{\"model\":\"opt-125m\",\"prompt\":\"p$i\",\"max_tokens\":4,\"seed\":$i}" >"$tmp/w$i" & pids+=($!)
        curl -sN --max-time 60 "$http/v1/completions" -H 'Content-Type: application/json' \
            -d "{\"model\":\"opt-125m\",\"prompt\":\"p$i\",\"max_tokens\":4,\"stream\":true}" >"$tmp/s$i" & pids+=($!)
        "$qctl" --json generate opt-125m "p$i" --max-tokens 4 >"$tmp/g$i" & pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || fail "a concurrent request failed"; done
    python3 - "$tmp" <<'PY' || fail "concurrent requests"
import json, sys
d = sys.argv[1]
for i in range(1, 5):
    w = json.load(open(f"{d}/w{i}"))
    assert w["usage"]["completion_tokens"] == 4 and w["choices"][0]["finish_reason"] == "length", w
    events = [l[6:] for l in open(f"{d}/s{i}").read().split("\n") if l.startswith("data: ")]
    assert events[-1] == "[DONE]", events
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length", chunks
    assert len(json.load(open(f"{d}/g{i}"))["tokens"]) == 4
PY
    note "12 concurrent requests answered in full"
    # Draining: /health says 503 while a request is in flight (rank 1 paused).
    kill -STOP "${rank_pids[1]}"
    "$qctl" --timeout 30 stats >/dev/null 2>&1 &
    inflight=$!
    sleep 0.5
    "$qctl" shutdown >/dev/null || fail "shutdown"
    get_status GET /health
    [ "$code" = 503 ] || fail "/health while draining: $code, want 503"
    expect_error 503 POST /v1/completions '{"model":"opt-125m","prompt":"x"}' "shutting down"
    kill -CONT "${rank_pids[1]}"
    wait "$inflight" || fail "the stats in flight failed"
    wait_exit 15
    [ "$rc" = 0 ] || fail "mpirun exited $rc after the drain, want 0"
    [ ! -e "$tmp/http" ] || fail "the HTTP address file is still there after a clean exit"
    grep -q 'HTTP POST /v1/completions from 127.0.0.1:[0-9]*: 200 in' "$log" || fail "no per-request log line"
    ;;
openai)
    if ! bash "$repo/deploy/fetch-model.sh" >"$tmp/fetch" 2>&1; then
        skip "the default model could not be fetched: $(tail -n 1 "$tmp/fetch")"
    fi
    # The real client, in a venv of its own under the build tree (kept
    # between runs: pip runs once).
    if ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
        rm -rf "$venv"
        python3 -m venv "$venv" >"$tmp/venv" 2>&1 || skip "python3 -m venv failed: $(tail -n 1 "$tmp/venv")"
        "$venv/bin/pip" install --quiet --disable-pip-version-check 'openai>=1' >"$tmp/pip" 2>&1 ||
            { rm -rf "$venv"; skip "pip install openai failed (is the package index reachable?): $(tail -n 1 "$tmp/pip")"; }
    fi
    note "openai $("$venv/bin/python" -c 'import openai; print(openai.__version__)')"
    start
    "$qctl" load smollm2-135m --scheme fp16 --max-seq 256 >/dev/null 2>"$tmp/err" || fail "load: $(cat "$tmp/err")"
    "$venv/bin/python" "$repo/tests/integration/openai_client.py" "$http/v1" smollm2-135m ||
        fail "the openai client"
    # A client that hangs up mid-stream stops the generation: the daemon
    # stays responsive and counts it as aborted. Synthetic weights have no
    # EOS, so only the hang-up can end it before max_tokens.
    "$qctl" load opt-125m --bits 3 --max-seq 2048 >/dev/null 2>"$tmp/err" || fail "load: $(cat "$tmp/err")"
    t0=$(date +%s)
    curl -sN --max-time 1 "$http/v1/completions" -H 'Content-Type: application/json' \
        -d '{"model":"opt-125m","prompt":"Once upon a time","max_tokens":2000,"stream":true}' >/dev/null
    for _ in $(seq 50); do
        get_status GET /metrics
        grep -q '^qshard_num_requests_running{model="opt-125m"} 0$' "$tmp/body" && break
        sleep 0.1
    done
    grep -q '^qshard_request_success_total{model="opt-125m",finished_reason="abort"} 1$' "$tmp/body" ||
        fail "the hung-up stream was not counted as aborted: $(grep "success_total{" "$tmp/body" | tr "\n" " ")"
    note "a client hanging up stopped its generation within $(($(date +%s) - t0)) s"
    "$qctl" shutdown >/dev/null || fail "shutdown"
    wait_exit 15
    [ "$rc" = 0 ] || fail "mpirun exited $rc after shutdown, want 0"
    ;;
*)
    fail "unknown case $case_name"
    ;;
esac
note "ok"
