"""Screenshot of the MLflow UI on a study's store, in a real headless Chromium (Debian `chromium`).

    python scripts/mlflow_screenshot.py --tracking-uri sqlite:///$PWD/mlflow.db --study quick \
        --out results/quick/mlflow_ui.png

Starts `mlflow ui` on 127.0.0.1 (free port, job execution off), opens the link the study prints
(ldct.tracking.store.ui_url: runs table of the trials, best first, "Model training" view) with a fresh
profile, writes the PNG, stops the server. `--page` picks another view of the same experiment
(e.g. `--page chart` for compareRunsMode=CHART). Not part of CI (it needs a browser).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"mlflow ui exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"mlflow ui did not answer on {url} within {seconds:.0f} s")


def main() -> int:
    from ldct.tracking import store as tracking_store

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tracking-uri", required=True, help="the study's store (sqlite:///... absolute)")
    parser.add_argument("--study", required=True, help="study name (experiment ldct/<study>)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument(
        "--page",
        default="table",
        choices=["table", "chart", "plain"],
        help="the study's link (table), its charts, or the bare experiment URL (what MLflow opens by itself)",
    )
    parser.add_argument("--size", default="1600,1000", help="window size W,H in pixels")
    parser.add_argument("--wait-ms", type=int, default=20000, help="virtual time the page gets to render")
    args = parser.parse_args()

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: apt-get update && apt-get install -y chromium")
    mlflow_client = tracking_store.client(args.tracking_uri)
    experiment = mlflow_client.get_experiment_by_name(f"ldct/{args.study}")
    if experiment is None:
        raise SystemExit(f"no experiment ldct/{args.study} in {args.tracking_uri}")

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    with tempfile.TemporaryDirectory(prefix="ldct-shot-") as tmp:
        server = subprocess.Popen(
            [str(mlflow_bin), "ui", "--backend-store-uri", mlflow_client.tracking_uri,
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=open(Path(tmp) / "ui.log", "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        try:
            _wait(base, server)
            url = tracking_store.ui_url(mlflow_client.tracking_uri, experiment.experiment_id, base=base)
            if args.page == "chart":
                url += "&compareRunsMode=CHART"
            elif args.page == "plain":
                url = f"{base}/#/experiments/{experiment.experiment_id}"
            out = Path(args.out).resolve()
            out.parent.mkdir(parents=True, exist_ok=True)
            command = [
                browser,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={Path(tmp) / 'profile'}",
                f"--window-size={args.size}",
                f"--virtual-time-budget={args.wait_ms}",
                f"--screenshot={out}",
                url,
            ]
            subprocess.run(command, check=True, timeout=180, capture_output=True)
            print(f"{out}  ({url})")
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
