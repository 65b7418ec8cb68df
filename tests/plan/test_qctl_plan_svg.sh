#!/usr/bin/env bash
# `qctl plan --svg`: the chart is a valid SVG image (rsvg-convert renders it)
# that names every scheme, and a bad path is refused with a sentence.
set -u
qctl=$1
command -v rsvg-convert >/dev/null || { echo "SKIP: rsvg-convert is needed (Debian's librsvg2-bin)"; exit 77; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/qs-svg.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

"$qctl" plan opt-175b --svg "$tmp/opt.svg" >"$tmp/out" || fail "qctl plan --svg exited $?"
grep -q 'bcq 3-bit g128' "$tmp/out" || fail "the table is no longer printed beside the chart"
rsvg-convert "$tmp/opt.svg" -o "$tmp/opt.png" 2>"$tmp/err" || fail "rsvg-convert: $(cat "$tmp/err")"
python3 - "$tmp/opt.png" "$tmp/opt.svg" <<'PY' || fail "the rendered chart"
import struct, sys
png = open(sys.argv[1], "rb").read()
assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
w, h = struct.unpack(">II", png[16:24])
assert w >= 600 and h >= 300, (w, h)
svg = open(sys.argv[2]).read()
for label in ("fp16", "w8a8 act-g128", "bcq 4-bit g128", "bcq 3-bit g128", "opt-175b"):
    assert label in svg, label
# The planner's answer at 80 GiB, in the legend.
for want in ("fp16: 6 x 80 GiB", "w8a8 act-g128: 3 x 80 GiB", "bcq 3-bit g128: 1 x 80 GiB"):
    assert want in svg, want
print(f"ok: {w}x{h} PNG from the SVG")
PY
# One scheme, another device size, to stdout.
"$qctl" plan smollm2-135m --bits 4 --device-memory 24GiB --svg - >"$tmp/one.svg" || fail "--svg -"
rsvg-convert "$tmp/one.svg" -o "$tmp/one.png" || fail "rsvg-convert on the one-scheme chart"
head -c 5 "$tmp/one.svg" | grep -q '<?xml' || fail "--svg - printed more than the SVG"
out=$("$qctl" plan opt-175b --svg /nonexistent/dir/x.svg 2>&1)
rc=$?
[ "$rc" = 1 ] && echo "$out" | grep -q "cannot write '/nonexistent/dir/x.svg'" || fail "a bad path: exit $rc: $out"
out=$("$qctl" plan opt-175b --svg 2>&1)
[ $? = 2 ] || fail "--svg without a file: $out"
echo "ok: qctl plan --svg"
