#!/usr/bin/env bash
# Create .venv (if missing) and install camfed with every extra.  Safe to re-run.
# torch/torchvision are pinned to the releases the development machines carry on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CAMFED_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install -q -e ".[all]"
echo "camfed installed in $VENV"
