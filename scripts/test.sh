#!/usr/bin/env bash
# README command two: set up, then run the whole test suite (CPU, real Ray and MLflow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The DICOM node tests run against a real Orthanc (Debian's) and DCMTK: installed here, before the
# clock of the suite starts; tests/_orthanc.py tries again and fails naming this script if it could not.
bash scripts/install_dicom.sh || echo "[test] scripts/install_dicom.sh failed: tests/test_dicom_node.py will fail" >&2
# ssh, rsync, nc for the launch test, and ip for cluster/node_env.sh's test (tests/test_cluster.py),
# which does not install anything itself.
bash scripts/install_ssh.sh || echo "[test] scripts/install_ssh.sh failed: the cluster tests will fail" >&2
# Passive OpenMP waiting: torch threads must not spin against Ray workers on 2 cores.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec .venv/bin/python -m pytest "$@"
