#!/usr/bin/env bash
# README command one: set up, then run the quick study on the built-in data set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec .venv/bin/python studies/loss_weights.py --profile quick "$@"
