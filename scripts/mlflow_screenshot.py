"""Screenshot of the MLflow UI on a study's store, in a real headless Chromium (Debian `chromium`).

    python scripts/mlflow_screenshot.py --tracking-uri sqlite:///$PWD/mlflow.db --study quick \
        --out results/quick/mlflow_ui.png

Starts `mlflow ui` on 127.0.0.1 (free port, job execution off), opens the link the study prints
(ldct.tracking.store.ui_url: runs table of the trials, best first, "Model training" view) with a fresh
profile, writes the PNG, stops the server. `--page` picks another view of the same experiment
(e.g. `--page chart` for compareRunsMode=CHART). Not part of CI (it needs a browser).

`--page compare` opens the other link the study prints (ldct.tracking.store.compare_url: MLflow's
compare view of the trial runs) and picks the parallel-coordinates axes, which MLflow otherwise
fills with the first three differing params in alphabetical order and one metric: the tuned
hyperparameters (ldct.hyperparams.TUNED) and the study's objectives. Choosing them means clicking,
so this page drives Chromium through Playwright (`pip install playwright`; it uses the Debian
browser, nothing is downloaded) and shoots the plot's panel.
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


def _axes(mlflow_client, run_ids: list[str], wanted_metrics: list[str]) -> tuple[list[str], list[str]]:
    """The tuned params that differ between the runs, and the wanted metrics that they all have."""
    from ldct.hyperparams import TUNED

    runs = [mlflow_client.get_run(run_id) for run_id in run_ids]
    params = [t.key for t in TUNED if len({r.data.params.get(t.key) for r in runs}) > 1]
    metrics = [m for m in wanted_metrics if all(m in r.data.metrics for r in runs)]
    return params, metrics


def _compare_shot(mlflow_client, experiment_id: str, base: str, browser: str, args, out: Path) -> str:
    """MLflow's compare view with the tuned params and objectives as parallel axes -> PNG."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise SystemExit(
            "--page compare needs Playwright: pip install playwright (the browser is Debian's)"
        ) from exc
    from ldct.tracking import store as tracking_store

    parent = tracking_store.find_run(
        mlflow_client,
        experiment_id,
        **{tracking_store.TAG_STUDY: args.study, tracking_store.TAG_ROLE: "study"},
    )
    if parent is None:
        raise SystemExit(f"no study run of {args.study} in {mlflow_client.tracking_uri}")
    run_ids = tracking_store.trial_run_ids(mlflow_client, experiment_id, parent.info.run_id)
    url = tracking_store.compare_url(mlflow_client.tracking_uri, experiment_id, run_ids, base=base)
    params, metrics = _axes(mlflow_client, run_ids, [m for m in args.metrics.split(",") if m])
    if not params or not metrics:
        raise SystemExit(
            f"nothing to draw: differing tuned params {params}, metrics on every trial {metrics}"
        )
    width, height = (int(v) for v in args.size.split(","))
    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chrome = playwright.chromium.launch(executable_path=browser, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = chrome.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            page.get_by_text("Parameters:").wait_for(timeout=args.wait_ms * 3)
            selects = page.locator(".du-bois-light-select-multiple")  # Parameters, then Metrics
            for index, names in ((0, params), (1, metrics)):
                box = selects.nth(index)
                # Drop MLflow's defaults, then add ours in order (an option's click toggles it).
                for chosen in box.locator(".du-bois-light-select-selection-item-remove").all()[::-1]:
                    chosen.click()
                for name in names:
                    # The search input, not the selector box: a click on the box reopened the
                    # dropdown in single-choice fashion for the second metric (MLflow 3.17).
                    box.locator("input").click()
                    page.keyboard.type(name)
                    page.keyboard.press("Enter")
                    page.keyboard.press("Escape")
            page.wait_for_timeout(2000)
            page.locator("[role=tabpanel]").first.screenshot(path=str(out))
        finally:
            chrome.close()
    return url


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
        choices=["table", "chart", "plain", "compare"],
        help="the study's link (table), its charts, the bare experiment URL (what MLflow opens by "
        "itself), or the compare view's parallel coordinates (compare)",
    )
    parser.add_argument(
        "--metrics",
        default=f"{tracking_store.BEST_METRIC},iq_lcd_auc,fps",
        help="--page compare: metric axes, those the trials have (default: the possible objectives)",
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
            if args.page == "compare":
                out = Path(args.out).resolve()
                url = _compare_shot(mlflow_client, experiment.experiment_id, base, browser, args, out)
                print(f"{out}  ({url})")
                return 0
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
