#!/usr/bin/env bash
# GPU check (at most 8 minutes): run from the repository root on a machine with one NVIDIA GPU and its own
# preinstalled torch (no internet needed).  Prints one JSON line per figure and writes them to
# $OUT/gpu-check.jsonl (or outputs/gpu-check/ when OUT is unset); benchmarks/gpu_check.py lists the cases:
# ResNet-50 256x128 AMP training images/s, a 2-round in-process federation of 3 cameras, evaluation / NFC /
# re-ranking at Market size, and peak GPU memory.
#
# Exit status: 0 = measured; 3 = no CUDA device (one line says so, nothing is installed or measured);
# 124 = the 8-minute limit ran out (the lines printed so far are in gpu-check.jsonl); other = an error.
#
# Wheels: the GPU machine has torch, numpy, scipy, scikit-learn, matplotlib, pillow, tqdm, filelock, grpcio,
# protobuf and typer, but not flwr and a few of its needs.  grpcio and protobuf come along anyway, at the versions
# tested here: the generated code of flwr and grpcio-health-checking refuses older runtimes at import
# (grpcio >= 1.81.1, protobuf >= 6.33.5 for grpcio-health-checking 1.81.1), and the machine's versions are unknown.  Build the wheelhouse once, on a machine with
# internet, from the repository root (for a Python 3.12 x86-64 target; change --python-version to match):
#     bash scripts/gpu-check.sh --build-wheelhouse       # writes .whl/ (about 16 MB; add /.whl/ to .git/info/exclude)
# and carry .whl/ to the GPU machine: the check installs it with --no-index --no-deps into /tmp/camfed-site.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS="${CAMFED_WHEELHOUSE:-.whl}"
# flwr 1.41 and what importing it pulls in beyond that machine's packages (versions as in scripts/setup.sh's venv)
WHEELHOUSE_SPECS=(flwr==1.41.0 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 grpcio-health-checking==1.81.1 iterators==0.0.2
                  pycryptodome==3.24.1 grpcio==1.85.3 protobuf==6.33.6)

if [ "${1:-}" = "--build-wheelhouse" ]; then
    mkdir -p "$WHEELS"
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" "${WHEELHOUSE_SPECS[@]}"
    exit 0
fi

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"; then
    echo "gpu-check: no CUDA device visible to $PYTHON's torch; nothing was measured (exit 3)" >&2
    exit 3
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
if ! "$PYTHON" -c "import flwr" 2>/dev/null; then
    if [ ! -d "$WHEELS" ]; then
        echo "gpu-check: flwr is not installed and there is no wheelhouse at $WHEELS (see the header of $0)" >&2
        exit 2
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/camfed-site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/camfed-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
timeout 480 "$PYTHON" benchmarks/gpu_check.py --out "${OUT:-outputs/gpu-check}"
