#!/usr/bin/env bash
# Create .venv (if missing) and install camfed with every extra.  Safe to re-run.
# scripts/constraints.txt pins torch/torchvision to the builds the development machines carry on disk;
# a user's own environment needs only pyproject's lower bounds (`pip install -e ".[all]"`).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CAMFED_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c scripts/constraints.txt -e ".[all]"
echo "camfed installed in $VENV"
