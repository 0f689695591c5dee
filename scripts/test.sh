#!/usr/bin/env bash
# README command two: set up, then run the whole test suite (CPU, real Ray and MLflow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Passive OpenMP waiting: torch threads must not spin against Ray workers on 2 cores.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec .venv/bin/python -m pytest "$@"
