#!/usr/bin/env bash
# The main job on a fresh machine: install camfed (scripts/setup.sh), then run a Flower federation on
# the built-in synthetic cameras (4 cameras, ImageNet EfficientNet-Lite0, 5 rounds of FedAvg; ~3 minutes on 2 CPU cores).
# Extra arguments go to `camfed federate`, e.g.  bash scripts/demo.sh --run-config "method='pem'"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
camfed federate "$@"
