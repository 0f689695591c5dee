"""Session fixtures for real Ray and real MLflow (imported by conftest.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs (the size of these machines), shared by the slow tests."""
    import ray

    if not ray.is_initialized():
        # ldct's own start (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S comes from conftest.py): its
        # State API pinned to its dashboard, so that the Rays started beside it (the `ray up`
        # cluster, the own-Ray studies) cannot blind Train V2's placement-group cleaner.
        from ldct.cluster import init_ray, running_cluster

        if (where := running_cluster()) is not None:
            pytest.fail(
                f"the suite starts a Ray of its own, and would join the one at {where}: stop it first"
            )
        init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def wait_for_http(
    url: str, process: subprocess.Popen, log: Path, seconds: float, what: str, tail: int = 3000
) -> None:
    """Until ``url`` answers 200; a server that exits or stays silent fails with its log's tail
    (and is killed, process group and all, when it stays silent)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text()[-tail:]}")
    os.killpg(process.pid, 9)
    raise RuntimeError(f"{what} did not answer in {seconds:g} s: {log.read_text()[-tail:]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, local artifacts), stopped afterwards."""
    port = _free_port()
    store = tmp_path / "server"
    store.mkdir()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    process = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination",
            str(store / "artifacts"),
        ],
        stdout=open(store / "server.log", "w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    wait_for_http(uri + "/health", process, store / "server.log", 90, "mlflow server", tail=2000)
    yield uri
    os.killpg(process.pid, 15)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
