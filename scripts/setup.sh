#!/usr/bin/env bash
# Creates .venv and installs the project with its pinned torch/torchvision pair. Idempotent: a
# stamp of pyproject.toml skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp=.venv/.ldct-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ -f $stamp && $(cat $stamp) == "$want" ]]; then
    exit 0
fi
echo "[setup] creating .venv with $($PYTHON --version) and installing ldct (first time: a few minutes)"
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch and torchvision first, as the one pair that imports timm here (pip takes them from disk).
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e '.[dev]'
echo "$want" > $stamp
echo "[setup] done"
