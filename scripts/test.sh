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
# out the `aftersuite` marker), then the tests that must run alone: the two-host cluster test,
# which takes both cores for minutes (tests/test_cluster_multinode.py), and elastic DDP, which
# needs an idle Ray (tests/test_train.py). Both parts run; the exit status fails if either did.
# LDCT_TESTS=suite or LDCT_TESTS=after runs one part.
part=${LDCT_TESTS:-all}
status=0
if [[ $part != after ]]; then
    started=$SECONDS
    .venv/bin/python -m pytest "$@" || status=$?
    echo "[test] the suite: exit $status, $((SECONDS - started)) s"
fi
if [[ $part != suite ]]; then
    started=$SECONDS
    after=0
    .venv/bin/python -m pytest -n 0 -m aftersuite tests/test_train.py tests/test_cluster_multinode.py "$@" || after=$?
    echo "[test] after the suite (two hosts, elastic DDP): exit $after, $((SECONDS - started)) s"
    [[ $status -ne 0 ]] || status=$after
fi
exit $status
