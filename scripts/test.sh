#!/usr/bin/env bash
# README command two: set up, then run the whole test suite (CPU, real Ray and MLflow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
