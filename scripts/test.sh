#!/usr/bin/env bash
# README command two: set up, then run the whole test suite (CPU, real Ray and MLflow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The DICOM node tests run against a real Orthanc (Debian's) and DCMTK: installed here, before the
# clock of the suite starts; tests/_orthanc.py tries again and fails naming this script if it could not.
bash scripts/install_dicom.sh || echo "[test] scripts/install_dicom.sh failed: tests/test_dicom_node.py will fail" >&2
# ssh, rsync, ip for the two-host test, and ip for cluster/node_env.sh's test (tests/test_cluster.py),
# which does not install anything itself.
bash scripts/install_ssh.sh || echo "[test] scripts/install_ssh.sh failed: the cluster tests will fail" >&2
# Passive OpenMP waiting: torch threads must not spin against Ray workers on 2 cores.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
# Two parts, each with the pytest options given here (e.g. -q): the suite (pyproject.toml leaves
# out the `twohost` marker), then the two-host cluster test on its own, since it takes both cores
# for minutes (tests/test_cluster_multinode.py). Both run; the exit status fails if either did.
# LDCT_TESTS=suite or LDCT_TESTS=twohost runs one part.
part=${LDCT_TESTS:-all}
status=0
if [[ $part != twohost ]]; then
    started=$SECONDS
    .venv/bin/python -m pytest "$@" || status=$?
    echo "[test] the suite: exit $status, $((SECONDS - started)) s"
fi
if [[ $part != suite ]]; then
    started=$SECONDS
    two=0
    .venv/bin/python -m pytest -n 0 -m twohost tests/test_cluster_multinode.py "$@" || two=$?
    echo "[test] the two-host test: exit $two, $((SECONDS - started)) s"
    [[ $status -ne 0 ]] || status=$two
fi
exit $status
