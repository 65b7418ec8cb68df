#!/usr/bin/env bash
# The Slurm batch scripts on a real, throw-away, one-node Slurm cluster:
# munged, slurmctld and slurmd on localhost with their configuration, state and
# logs in a temp dir, two fake GPUs (character devices) so --gpus-per-task=1
# works as written. Then:
#   1. deploy/slurm/generate-eval.sbatch: health, load, generate, eval, stats,
#      shutdown; the job must end COMPLETED with exit 0 and leave its outputs.
#   2. deploy/slurm/qdaemon.sbatch: reachable through the address file it
#      publishes; SIGTERM to the batch shell (what --signal=B:TERM@120 sends)
#      must drain it and end the job COMPLETED, exit 0.
#   3. The same with a qctl whose shutdown fails: the script's fallback must
#      signal the ranks itself and still end COMPLETED, exit 0.
# QSHARD_LAUNCHER=mpirun in the environment runs them under mpirun instead
# of srun --mpi=pmix.
#
#   test_slurm_job.sh QDAEMON QCTL REPO_ROOT
#
# Exit 77 (skipped) when Slurm is not installed and QS_TEST_SLURM is not set,
# when not root, or when the Slurm daemons cannot start here; the reason is
# printed. QS_TEST_SLURM=1 installs slurm-wlm and munge (deploy/setup.sh
# --slurm) if missing. QS_KEEP_TMP=1 keeps the temp dir for a post-mortem.
set -euo pipefail

qdaemon=${1:-} qctl=${2:-} repo=${3:-}
skip() { echo "SKIP: $*"; exit 77; }
fail() { echo "FAIL: $*" >&2; exit 1; }
note() { echo "test_slurm: $*"; }

[ -f "${repo:-.}/deploy/slurm/generate-eval.sbatch" ] || { echo "usage: $0 QDAEMON QCTL REPO_ROOT" >&2; exit 2; }
[ -x "${qdaemon:-/nonexistent}" ] || skip "qdaemon is not built (daemon/ has no qdaemon target yet)"
[ -x "$qctl" ] || skip "qctl is not built: $qctl"
# Absolute paths: the jobs run in another directory, through symlinks.
qdaemon=$(readlink -f "$qdaemon") qctl=$(readlink -f "$qctl") repo=$(readlink -f "$repo")
[ "$(id -u)" = 0 ] || skip "needs root: slurmd runs jobs as any user, and this cluster uses SlurmUser=root"

need=(munged munge slurmctld slurmd sbatch squeue scontrol scancel sinfo)
have_slurm() { local c; for c in "${need[@]}"; do command -v "$c" >/dev/null || return 1; done; }
if ! have_slurm; then
    # The default ctest run stays offline: installing is opt-in.
    [ "${QS_TEST_SLURM:-0}" = 1 ] || skip "slurm-wlm and munge are not installed; run 'bash deploy/setup.sh --slurm' or set QS_TEST_SLURM=1 to let this test install them"
    note "installing slurm-wlm and munge (deploy/setup.sh --slurm)"
    bash "$repo/deploy/setup.sh" --slurm || skip "deploy/setup.sh --slurm failed (no network?)"
    have_slurm || skip "slurm-wlm installed but one of ${need[*]} is still missing"
fi

# A short path: munge's socket path must fit in sockaddr_un (108 bytes).
# munged wants every directory above its socket world-executable.
tmp=$(mktemp -d /tmp/qs-slurm.XXXXXX)
chmod 755 "$tmp"
pids=()
# shellcheck disable=SC2317  # invoked by the trap
cleanup() {
    local rc=$? p
    # Cancel whatever is still queued or running, then stop the daemons.
    if [ -f "$tmp/slurm.conf" ]; then
        SLURM_CONF=$tmp/slurm.conf timeout 10 scancel --full --signal=KILL --partition=qstest >/dev/null 2>&1 || true
    fi
    # slurmd, slurmctld, munged: the reverse of the start order, so each
    # still has what it needs (munge) while it shuts down.
    local i
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        p=${pids[i]}
        kill -TERM "$p" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    # A rank orphaned by a failed step: only ours, found by the unique temp path.
    for p in $(pgrep -f "$tmp/bin/" || true); do kill -KILL "$p" 2>/dev/null || true; done
    if [ $rc != 0 ] && [ $rc != 77 ]; then
        for f in "$tmp"/log/slurmctld.log "$tmp"/log/slurmd.log; do
            [ -f "$f" ] && { echo "--- tail $f"; tail -n 25 "$f"; }
        done
    fi
    if [ "${QS_KEEP_TMP:-0}" = 1 ]; then echo "kept $tmp"; else rm -rf "$tmp"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 1' INT TERM
# A command that fails under set -e says where, instead of ending the test silently.
trap 'echo "FAIL: line $LINENO: $BASH_COMMAND exited $?" >&2' ERR
mkdir -p "$tmp"/{munge,state,spool,log,dev,bin,job,tmpfs}

# --- munge: our own key and socket, independent of any system munged --------
dd if=/dev/urandom of="$tmp/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$tmp/munge/munge.key"
sock=$tmp/munge/munge.sock
munged --foreground --force --key-file="$tmp/munge/munge.key" --socket="$sock" \
    --pid-file="$tmp/munge/munged.pid" --seed-file="$tmp/munge/seed" \
    --log-file="$tmp/log/munged.log" >"$tmp/log/munged.out" 2>&1 &
pids+=($!)
for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
if ! munge --socket="$sock" -n 2>/dev/null | unmunge --socket="$sock" >/dev/null 2>&1; then
    skip "munged did not start or does not answer on $sock: $(tail -n 3 "$tmp/log/munged.log" "$tmp/log/munged.out" 2>/dev/null | tr '\n' ' ')"
fi

# --- slurm.conf: one node, this machine's real CPUs and memory ---------------
host=$(hostname -s)
node=$(slurmd -C | head -n1 | sed 's/ UpTime=.*//')
case $node in NodeName=*) ;; *) skip "slurmd -C did not describe this node: $node" ;; esac
node=${node/NodeName=* CPUs=/NodeName=$host CPUs=}  # as SlurmctldHost names it
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ctld_port=$(free_port) slurmd_port=$(free_port)
[ "$ctld_port" != "$slurmd_port" ] || slurmd_port=$(free_port)
# Two fake GPUs: gres/gpu drops GPUs with no device file, and Slurm only
# needs character devices to exist (task/none: no device cgroup). Our own
# (same numbers as /dev/null), or where mknod is not allowed /dev/null and
# /dev/zero; Slurm still sets CUDA_VISIBLE_DEVICES=0 and 1 per task.
if mknod "$tmp/dev/nvidia0" c 1 3 2>/dev/null && mknod "$tmp/dev/nvidia1" c 1 3 2>/dev/null; then
    gpu_files="$tmp/dev/nvidia[0-1]"  # a Slurm range, not a glob
else
    gpu_files=/dev/null,/dev/zero
fi
cat >"$tmp/gres.conf" <<EOF
NodeName=$host Name=gpu File=$gpu_files
EOF
cat >"$tmp/slurm.conf" <<EOF
# Throw-away one-node cluster for tests/slurm; no cgroups, no accounting daemon.
ClusterName=qstest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock
StateSaveLocation=$tmp/state
SlurmdSpoolDir=$tmp/spool
SlurmctldPidFile=$tmp/slurmctld.pid
SlurmdPidFile=$tmp/slurmd.pid
SlurmctldLogFile=$tmp/log/slurmctld.log
SlurmdLogFile=$tmp/log/slurmd.log
# Private TmpFS and job ids: the PMIx plugin names its directories
# TmpFS/spmix_appdir_<uid>_<jobid>.<step>, which must not collide with
# another copy of this test running at the same time.
TmpFS=$tmp/tmpfs
FirstJobId=$((1000 + RANDOM))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$tmp/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
MpiDefault=none
ReturnToService=2
# Keep finished jobs in scontrol's view long enough to read their state.
MinJobAge=600
KillWait=10
$node Gres=gpu:2 NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=qstest Nodes=$host Default=YES MaxTime=10 State=UP
EOF
export SLURM_CONF=$tmp/slurm.conf
unset SLURM_JOB_ID SLURM_JOBID  # in case ctest itself runs inside a Slurm job

slurmctld -D -c -f "$SLURM_CONF" >"$tmp/log/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D -f "$SLURM_CONF" >"$tmp/log/slurmd.out" 2>&1 &
pids+=($!)
t0=$SECONDS state=""
while [ $((SECONDS - t0)) -lt 30 ]; do
    for p in "${pids[@]}"; do
        kill -0 "$p" 2>/dev/null || skip "a Slurm daemon exited at start: $(tail -n 4 "$tmp"/log/slurm*.out "$tmp"/log/slurm*.log 2>/dev/null | tr '\n' ' ')"
    done
    state=$(sinfo -h -N -o %T 2>/dev/null || true)
    [ "$state" = idle ] && break
    sleep 0.5
done
[ "$state" = idle ] || skip "the node did not become idle in 30 s (state '$state'): $(grep -h error "$tmp"/log/slurm*.log 2>/dev/null | tail -n 4 | tr '\n' ' ')"
note "cluster up in $((SECONDS - t0)) s: $(sinfo -h -N -o '%N %T cpus=%c gres=%G')"

# --- the jobs ------------------------------------------------------------------
ln -s "$qdaemon" "$tmp/bin/qdaemon"
ln -s "$qctl" "$tmp/bin/qctl"
# Only the settings this test chooses (QSHARD_LAUNCHER may pick mpirun).
unset QSHARD_MODEL QSHARD_NAME QSHARD_LOAD_ARGS QSHARD_GENERATE_ARGS QSHARD_EVAL_ARGS \
    QSHARD_DAEMON_ARGS QSHARD_LISTEN QSHARD_ALLOW_REMOTE QSHARD_OUT QSHARD_MODEL_STEPS_OPTIONAL
export QSHARD_BIN=$tmp/bin QSHARD_HOME=$repo
# Open MPI refuses root unless told (mpirun launcher; srun is the default).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
job_opts=(--parsable --chdir="$tmp/job" --ntasks-per-node=2 --cpus-per-task=1 --time=5)

# Empty, not an error, when scontrol has no answer this time (set -e).
job_state() { { scontrol show job -o "$1" 2>/dev/null || true; } | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }
job_exit() { { scontrol show job -o "$1" 2>/dev/null || true; } | sed -n 's/.* ExitCode=\([0-9:]*\).*/\1/p'; }
# SIGTERM to the batch shell, as --signal=B:TERM does; retried, since a job
# that has just started may not take signals yet.
term_batch() {
    local i
    for i in 1 2 3 4 5; do
        scancel --batch --signal=TERM "$1" 2>/dev/null && return 0
        sleep 1
    done
    show_job "$1" "qd-$1.out"; fail "scancel --batch --signal=TERM $1 failed 5 times"
}
wait_job() {  # wait_job ID SECONDS -> prints the final state
    local id=$1 limit=$2 t=$SECONDS s
    while :; do
        s=$(job_state "$id")
        case $s in
            COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|PREEMPTED|BOOT_FAIL|DEADLINE)
                echo "$s"; return 0 ;;
        esac
        if [ $((SECONDS - t)) -ge "$limit" ]; then
            scancel "$id" 2>/dev/null || true
            echo "TIMEOUT_IN_TEST($s)"; return 0
        fi
        sleep 0.5
    done
}
show_job() {  # the job's own output, for any failure
    echo "--- job $1 output"; cat "$tmp/job/$2" 2>/dev/null || true
    if [ -n "${3:-}" ] && [ -f "$3/daemon.log" ]; then echo "--- daemon.log"; tail -n 30 "$3/daemon.log"; fi
}

# 1. generate-eval.sbatch. A short eval text keeps the test fast once eval works.
prompts=$tmp/job/prompts.txt
printf '%s\n' "The capital of France is" "Quantized weights take" >"$prompts"
wiki=$repo/../shared/data/wikitext-2-raw/wiki.test.raw
if [ -r "$wiki" ]; then head -n 40 "$wiki" >"$tmp/job/eval.txt"
else printf ' = Robert Boulter = \n Robert Boulter is an English film and television actor .\n' >"$tmp/job/eval.txt"; fi
out=$tmp/job/out1
# The model: the script's default, the project's GGUF (SmolLM2-135M, with a
# tokenizer, so generate and eval see real text, on one rank) when
# deploy/fetch-model.sh has it cached; PIP_NO_INDEX keeps the test and the
# job offline. Else a synthetic opt-125m on both ranks (12 heads), which
# loads and generates token ids but cannot eval.
job_env=(QSHARD_OUT="$out" QSHARD_START_TIMEOUT=60 QSHARD_STOP_TIMEOUT=60 PIP_NO_INDEX=1
         QSHARD_GENERATE_ARGS="--max-tokens 4" QSHARD_EVAL_ARGS="--ctx 128 --max-chunks 1")
# With the real model all three model steps must work and the job must say
# so itself; the synthetic one cannot eval, so there the job tolerates model
# step failures (QSHARD_MODEL_STEPS_OPTIONAL) and the checks below require
# load and generate and accept eval's refusal.
if model=$(PIP_NO_INDEX=1 bash "$repo/deploy/fetch-model.sh" 2>/dev/null) && [ -f "$model" ]; then
    note "model: the default, $model"
    required="load generate eval"
else
    job_env+=(QSHARD_MODEL=opt-125m QSHARD_MODEL_STEPS_OPTIONAL=1)
    note "model: opt-125m, synthetic (no cached default model): eval may be refused"
    required="load generate"
fi
t0=$SECONDS
id=$(env "${job_env[@]}" sbatch "${job_opts[@]}" --output="$tmp/job/ge-%j.out" \
     "$repo/deploy/slurm/generate-eval.sbatch" "$prompts" "$tmp/job/eval.txt")
note "submitted generate-eval.sbatch as job $id"
st=$(wait_job "$id" 150)
rcx=$(job_exit "$id")
note "job $id: $st, exit $rcx, $((SECONDS - t0)) s"
[ "$st $rcx" = "COMPLETED 0:0" ] || { show_job "$id" "ge-$id.out" "$out"; fail "generate-eval job ended $st with exit $rcx (want COMPLETED, 0:0)"; }
cat "$tmp/job/ge-$id.out" || true

check() { [ "$@" ] || { show_job "$id" "ge-$id.out" "$out"; fail "check failed: [ $* ]"; }; }
step_rc() { awk -F'\t' -v s="$1" '$1 == s { print $2 }' "$out/steps.tsv"; }
for f in daemon.log health.txt stats.json steps.tsv summary.txt; do check -s "$out/$f"; done
# Rank 0 removes its address file as it exits: gone means a clean exit.
check ! -e "$out/qdaemon.addr"
grep -q '^job=.* addr=[^ ]*:[0-9][0-9]* ' "$out/summary.txt" || fail "summary.txt has no daemon address"
check "$(step_rc health)" = 0
check "$(step_rc stats)" = 0
check "$(step_rc shutdown)" = 0
check "$(step_rc daemon)" = 0  # every rank exited 0 after the drain
grep -qx 'failed=' "$out/summary.txt" || { cat "$out/summary.txt"; fail "summary lists failed steps"; }
# stats --json: one JSON object; where it reports the world size, 2 ranks.
python3 - "$out/stats.json" <<'EOF' || { show_job "$id" "ge-$id.out" "$out"; fail "stats.json is not what qctl stats --json should print"; }
import json, sys
d = json.load(open(sys.argv[1]))
assert isinstance(d, dict) and d, f"not a non-empty JSON object: {d!r}"
def find(o, keys):
    if isinstance(o, dict):
        for k, v in o.items():
            if k in keys and isinstance(v, int): return v
            r = find(v, keys)
            if r is not None: return r
    return None
ws = find(d, {"world_size", "ranks", "world"})
assert ws in (None, 2), f"world size {ws}, want 2"
# qctl stats --json as it is today: one entry per rank's device.
devs = d.get("devices")
if devs is not None:
    assert sorted(x.get("rank") for x in devs) == [0, 1], f"devices: {devs!r}"
print("test_slurm: stats.json keys:", ", ".join(sorted(d)))
EOF
# load/generate/eval: the required ones must succeed, with their outputs
# checked; another may only be refused (exit 1) with a message saying why.
for s in load generate eval; do
    rc=$(step_rc "$s")
    case " $required " in
        *" $s "*) [ "$rc" = 0 ] || { show_job "$id" "ge-$id.out" "$out"; fail "$s failed (exit $rc): $(head -n 3 "$out/$s.log" 2>/dev/null)"; } ;;
    esac
    if [ "$rc" = 0 ]; then
        case $s in
            load) served=$(sed -n 's/.* name=\([^ ]*\).*/\1/p' "$out/summary.txt")
                  grep -qF "\"$served\"" "$out/stats.json" ||
                      fail "stats.json does not list the loaded model $served" ;;
            generate) check "$(grep -c '^### ' "$out/generate.txt")" = 2
                      check "$(grep -vc '^### \|^$' "$out/generate.txt")" -ge 1 ;;
            eval) grep -qiE '[0-9]+\.[0-9]+' "$out/eval.txt" || fail "eval.txt has no number: $(head -c 300 "$out/eval.txt")" ;;
        esac
        note "$s: ok"
    else
        check "$rc" = 1
        check -s "$out/$s.log"
        note "$s: refused, as allowed here (exit $rc): $(head -n 1 "$out/$s.log")"
    fi
done

# 2. qdaemon.sbatch, stopped as the time limit stops it: SIGTERM to the batch shell.
t0=$SECONDS
id=$(QSHARD_LISTEN=127.0.0.1:0 sbatch "${job_opts[@]}" --output="$tmp/job/qd-%j.out" \
     "$repo/deploy/slurm/qdaemon.sbatch")
note "submitted qdaemon.sbatch as job $id"
addr_file=$tmp/job/qdaemon-$id.addr
for _ in $(seq 120); do
    [ -s "$addr_file" ] && break
    s=$(job_state "$id"); case $s in PENDING|RUNNING|CONFIGURING) ;; *) break ;; esac
    sleep 0.5
done
[ -s "$addr_file" ] || { show_job "$id" "qd-$id.out"; fail "qdaemon job $id published no address (state $(job_state "$id"))"; }
"$qctl" --addr "$(cat "$addr_file")" health || { show_job "$id" "qd-$id.out"; fail "qctl health against the job's address failed"; }
term_batch "$id"
st=$(wait_job "$id" 90)
rcx=$(job_exit "$id")
note "job $id: $st, exit $rcx, $((SECONDS - t0)) s"
[ "$st $rcx" = "COMPLETED 0:0" ] || { show_job "$id" "qd-$id.out"; fail "qdaemon job ended $st with exit $rcx after SIGTERM (want COMPLETED, 0:0)"; }
[ ! -e "$addr_file" ] || fail "the address file outlived the job"
grep -q 'SIGTERM: draining' "$tmp/job/qd-$id.out" || { show_job "$id" "qd-$id.out"; fail "the job did not handle SIGTERM"; }
# The drain went through qctl shutdown, not the fallback of signalling srun.
if grep -q 'qctl shutdown failed' "$tmp/job/qd-$id.out"; then show_job "$id" "qd-$id.out"; fail "qctl shutdown failed in the SIGTERM handler"; fi

# 3. The same, when qctl cannot reach rank 0: the script must signal the ranks
# itself (not srun, which would kill them) and still end COMPLETED, exit 0.
mkdir -p "$tmp/bin-noctl"
ln -s "$qdaemon" "$tmp/bin-noctl/qdaemon"
# shellcheck disable=SC2016  # $@ and $a belong to the generated script
printf '#!/bin/sh\n# qctl whose shutdown never reaches the daemon.\nfor a in "$@"; do [ "$a" = shutdown ] && { echo "qctl: unreachable (test)" >&2; exit 3; }; done\nexec %s "$@"\n' \
    "$qctl" >"$tmp/bin-noctl/qctl"
chmod +x "$tmp/bin-noctl/qctl"
t0=$SECONDS
id=$(QSHARD_BIN=$tmp/bin-noctl sbatch "${job_opts[@]}" --output="$tmp/job/qd-%j.out" \
     "$repo/deploy/slurm/qdaemon.sbatch")
for _ in $(seq 120); do
    [ -s "$tmp/job/qdaemon-$id.addr" ] && break
    s=$(job_state "$id"); case $s in PENDING|RUNNING|CONFIGURING) ;; *) break ;; esac
    sleep 0.5
done
[ -s "$tmp/job/qdaemon-$id.addr" ] || { show_job "$id" "qd-$id.out"; fail "qdaemon job $id published no address"; }
term_batch "$id"
st=$(wait_job "$id" 90)
rcx=$(job_exit "$id")
note "job $id (qctl shutdown failing): $st, exit $rcx, $((SECONDS - t0)) s"
[ "$st $rcx" = "COMPLETED 0:0" ] || { show_job "$id" "qd-$id.out"; fail "the SIGTERM fallback did not drain the daemon (job $st, exit $rcx)"; }
grep -q 'sending SIGTERM to the ranks' "$tmp/job/qd-$id.out" || { show_job "$id" "qd-$id.out"; fail "the fallback did not run"; }

if pgrep -f "$tmp/bin" >/dev/null; then fail "qdaemon ranks still running after the jobs ended"; fi
note "PASS"
