#!/usr/bin/env bash
# Installs the Debian 12 packages qshard builds and tests with. Idempotent:
# does nothing when all are present. The CUDA toolkit (nvcc, cuBLAS, NCCL) is
# not installed here; CMake detects it under /usr/local/cuda when present.
#
#   deploy/setup.sh            build and test dependencies
#   deploy/setup.sh --slurm    also Slurm and munge (the slurm-labelled test)
set -euo pipefail

pkgs=(
    build-essential cmake pkg-config git python3
    libgrpc-dev libprotobuf-c-dev protobuf-c-compiler   # gRPC C core, protobuf-c, protoc-c
    libopenmpi-dev openmpi-bin                          # MPI ranks under mpirun
    libopenblas-dev                                     # fp32 baseline for qbench
    libcjson-dev libcmocka-dev                          # JSON output, unit tests
    libmicrohttpd-dev                                   # qdaemon --http: metrics, OpenAI API
    prometheus librsvg2-bin curl python3-venv           # tests: promtool, rsvg-convert, clients
    clang libclang-rt-14-dev openssl                    # tests: libFuzzer harnesses, TLS certificates
)
if [ "${1:-}" = "--slurm" ]; then
    pkgs+=(slurm-wlm munge procps)   # procps: pgrep in tests/slurm
fi

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

echo "qshard setup: installing ${missing[*]}"
sudo=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "qshard setup: run as root or install sudo" >&2; exit 1; }
    sudo=sudo
fi
# Wait for another apt (unattended upgrades, a parallel job) instead of failing.
apt_opts=(-o DPkg::Lock::Timeout=300 -y -q)
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get "${apt_opts[@]}" update
$sudo apt-get "${apt_opts[@]}" install --no-install-recommends "${missing[@]}"
