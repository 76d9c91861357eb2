#!/usr/bin/env bash
# Lint and import order with ruff (rules in pyproject.toml [tool.ruff]).  `scripts/lint.sh --fix` applies
# the safe fixes.  Uses .venv's ruff (installed by scripts/setup.sh through the `test` extra).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${CAMFED_VENV:-.venv}/bin/ruff" check "$@" .
