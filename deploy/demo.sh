#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: installs what is
# missing, builds, then shows what qshard plans for the paper's headline model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
cmake -S . -B build >/dev/null
cmake --build build -j "$(nproc)" >/dev/null
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

echo "== qctl plan opt-175b: memory and GPUs from fp16 to W8A8 to 3-bit (80 GiB GPUs)"
build/ctl/qctl plan opt-175b
echo
echo "== qctl plan opt-175b --bits 3 --gpus 1: the LUT-GEMM claim, in detail"
build/ctl/qctl plan opt-175b --bits 3 --gpus 1
