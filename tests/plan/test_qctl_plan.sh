#!/usr/bin/env bash
# `qctl plan` as a user runs it: output, JSON and the exit code of bad input.
set -u
qctl=$1
fail=0
check() { # check DESCRIPTION WANT_RC CMD...
    local what=$1 want=$2; shift 2
    out=$("$@" 2>&1); rc=$?
    if [ "$rc" != "$want" ]; then
        echo "FAIL: $what: exit $rc, want $want"; echo "$out" | head -5; fail=1
    elif [ "$want" = 2 ] && ! echo "$out" | grep -q '[a-z].* .*[a-z]'; then
        echo "FAIL: $what: no sentence on bad input"; fail=1
    else
        echo "ok: $what"
    fi
}

check "table" 0 "$qctl" plan opt-175b
check "detail" 0 "$qctl" plan opt-175b --bits 3 --gpus 1
check "help" 0 "$qctl" plan --help
check "unknown model" 2 "$qctl" plan gpt-5
echo "$out" | grep -q "llama-3-70b" || { echo "FAIL: unknown model does not list the known ones"; fail=1; }
check "bits 9" 2 "$qctl" plan opt-175b --bits 9
check "bits 0" 2 "$qctl" plan opt-175b --bits 0
check "bits 12" 2 "$qctl" plan opt-175b --bits 12
check "group 100" 2 "$qctl" plan opt-175b --bits 3 --group 100
check "group not dividing" 2 "$qctl" plan smollm2-135m --bits 4 --group 128
check "group 1024 at tp 8" 2 "$qctl" plan opt-175b --bits 3 --group 1024 --gpus 8
check "gpus 0" 2 "$qctl" plan opt-175b --gpus 0
check "gpus absurd" 2 "$qctl" plan opt-175b --gpus 100000000000
check "gpus 5 invalid split" 2 "$qctl" plan opt-175b --gpus 5
echo "$out" | grep -q "valid degrees: 1, 2, 3, 4, 6, 8" || { echo "FAIL: no valid degrees named"; fail=1; }
for s in 80GB "80 GiB" abc -1 99999999999999999999999999 ""; do
    check "device memory '$s'" 2 "$qctl" plan opt-175b --device-memory "$s"
done
check "w8a8 with 4 bits" 2 "$qctl" plan opt-175b --scheme w8a8 --bits 4
check "seq past context" 2 "$qctl" plan opt-175b --seq 4096
check "kv cache int9" 2 "$qctl" plan opt-175b --kv-cache int9
check "kv cache int8 detail" 0 "$qctl" plan llama-2-70b --bits 4 --gpus 1 --seq 4096 --kv-cache int8
echo "$out" | grep -Eq "sequences of 4096 tokens that fit on 1 GPU: [0-9]+ with the int8 KV cache \(fp16: [0-9]+\)" ||
    { echo "FAIL: the int8 detail does not say how many sequences fit against fp16"; fail=1; }
check "no model" 2 "$qctl" plan
check "unknown option" 2 "$qctl" plan opt-175b --frobnicate

# The sources' numbers, through the JSON a script would read.
json=$("$qctl" plan opt-175b --json) || { echo "FAIL: --json exit"; fail=1; }
python3 - "$json" <<'PY' || fail=1
import json, sys
o = json.loads(sys.argv[1])
rows = {(r["scheme"], r["bits"]): r for r in o["schemes"]}
for r in o["schemes"]:
    for k in ("scheme", "bits", "group_size", "weight_bytes", "bytes_per_gpu", "min_gpus"):
        assert k in r, k
fp16, w8, b4, b3 = rows[("fp16", 16)], rows[("w8a8", 8)], rows[("bcq", 4)], rows[("bcq", 3)]
assert fp16["weight_bytes"] == 2 * 174604468224, fp16["weight_bytes"]
assert (fp16["min_gpus_memory"], fp16["min_gpus"]) == (5, 6), fp16
assert w8["min_gpus"] == 3, w8
assert b3["min_gpus"] == 1 and b3["group_size"] == 128, b3
assert fp16["weight_bytes"] > w8["weight_bytes"] > b4["weight_bytes"] > b3["weight_bytes"]
print("ok: json numbers")
PY
json=$("$qctl" plan opt-175b --scheme fp16 --gpus 4 --json)
python3 -c 'import json,sys; r=json.loads(sys.argv[1])["schemes"][0]; assert r["fits"] is False and r["tp"]==4 and r["bytes_per_gpu"] > 80*2**30, r; print("ok: fp16 not on 4")' "$json" || fail=1
# The KV cache's formats: int8 and int4 hold more sequences than fp16 in the same memory.
for kv in fp16 int8 int4; do
    "$qctl" plan llama-2-70b --bits 4 --gpus 1 --seq 4096 --kv-cache $kv --json >"${TMPDIR:-/tmp}/qs-plan-kv-$$-$kv" || fail=1
done
python3 - "${TMPDIR:-/tmp}/qs-plan-kv-$$" <<'PY' || fail=1
import json, sys
r = {k: json.load(open(f"{sys.argv[1]}-{k}")) for k in ("fp16", "int8", "int4")}
row = {k: v["schemes"][0] for k, v in r.items()}
kv = {k: v["per_gpu"]["kv_cache"] for k, v in row.items()}
assert r["int8"]["kv_cache"] == "int8", r["int8"]["kv_cache"]
assert kv["fp16"] == 2 * 80 * 4096 * 8 * 128 * 2, kv
assert kv["int8"] * 2 == kv["fp16"] * 9 // 8 and kv["int4"] * 16 == kv["fp16"] * 5, kv
assert row["fp16"]["max_batch"] < row["int8"]["max_batch"] < row["int4"]["max_batch"], row
print("ok: kv cache formats in the plan:", {k: v["max_batch"] for k, v in row.items()}, "sequences")
PY
rm -f "${TMPDIR:-/tmp}/qs-plan-kv-$$"-*
exit $fail
