"""The cluster journey for real: `ray up` cluster/local.yaml on this machine over SSH, `ray submit`
the smoke study, `ray job submit` it under another name, `ray down`.

The head is 127.0.0.1, reached through a private sshd (127.0.0.1 only, a key made here, a
temporary HOME for the SSH user). That sshd runs in its own PID namespace (`unshare --pid`):
the launcher's `ray stop` (in `ray up` and `ray down`) kills every Ray process it can see, and it
must not see the Ray of this test session or of anyone else on the machine; and stopping sshd,
the namespace's init, ends whatever the cluster left. The cluster config is cluster/local.yaml
itself with the overrides a one-machine test needs (addresses, ports, this suite's environment
instead of pip installs); see `_test_variant`.

Needs root (sshd logs in as root, unshare); installs openssh-server, rsync and netcat with
scripts/install_ssh.sh where they are missing.

A launcher step silent for QUIET_S seconds fails then, not at its timeout; a failed run copies
the launcher's output, sshd's log and the head's Ray session logs to /tmp/ldct-launch-failed-*
(kept, and named on stderr with the tails of the Ray logs) before the test's tree is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from _ray_fixtures import _free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


# A launcher step that prints nothing for this long is taken as hung: Ray Tune prints its status
# table every ~30 s and the launcher each of its phases, so silence means no progress. (A hang of
# `ray job submit` once waited out its whole 600 s timeout and left no log; issue 24.)
QUIET_S = float(os.environ.get("LDCT_LAUNCH_QUIET_S", "240"))


def _run(cmd: list[str], env: dict[str, str], timeout: float, log: Path, ok: bool = True) -> str:
    """Run a launcher command, keep its output for the README (and for a failure's message).

    Fails after ``timeout`` seconds, or sooner after ``QUIET_S`` seconds without a line of output,
    with what it printed so far; the log file keeps every line as it comes."""
    started = time.perf_counter()
    lines: list[str] = []
    last = [time.monotonic()]
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

        def pump() -> None:
            for line in proc.stdout:
                lines.append(line)
                fh.write(line)
                fh.flush()
                last[0] = time.monotonic()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        why = ""
        while proc.poll() is None:
            if time.perf_counter() - started > timeout:
                why = f"still running after {timeout:.0f} s"
            elif time.monotonic() - last[0] > QUIET_S:
                why = f"no output for {QUIET_S:.0f} s"
            if why:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(1)
        reader.join(timeout=10)
        seconds = time.perf_counter() - started
        fh.write(f"[exit {proc.returncode}, {seconds:.0f} s{'; killed: ' + why if why else ''}]\n\n")
    out = "".join(lines)
    assert not why, f"{' '.join(cmd[:3])} killed, {why}:\n{out[-6000:]}"
    if ok:
        assert proc.returncode == 0, f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{out[-6000:]}"
    else:
        assert proc.returncode != 0, f"{' '.join(cmd[:3])} should have failed:\n{out[-3000:]}"
    return out


class Site:
    """The head's side: a private sshd in its own PID namespace, logging root in with a temporary HOME."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.user = "root"
        self.home = base / "home"
        self.port = _free_port()
        self.client_home = base / "client"
        self.key = self.client_home / "id_ed25519"
        self.unshare: subprocess.Popen | None = None
        self.made_run_sshd = False

    def start(self) -> None:
        subprocess.run(["bash", str(ROOT / "scripts" / "install_ssh.sh")], check=True, timeout=600)
        self.client_home.mkdir(mode=0o700)
        (self.home / "tmp").mkdir(parents=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        # The SSH user's sessions start in its passwd home; this one's is the temporary HOME.
        (self.home / ".bashrc").write_text("cd ~\n")
        sshd_dir = self.base / "sshd"
        sshd_dir.mkdir()
        shutil.copy(self.key.with_suffix(".pub"), sshd_dir / "authorized_keys")
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(sshd_dir / "host")], check=True
        )
        (sshd_dir / "sshd_config").write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {sshd_dir / 'host'}",
                    f"PidFile {sshd_dir / 'sshd.pid'}",
                    f"AllowUsers {self.user}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",  # the keys lie under /tmp (mode 1777), which it would refuse
                    f"AuthorizedKeysFile {sshd_dir / 'authorized_keys'}",
                    # Nothing in the real home; Ray's temp dir in the test's own tree (/tmp/ray is
                    # the test session's, and its ray_current_cluster is what ray.init() joins).
                    # LDCT_HOME is the session's, as a share would be: the built-in set and its
                    # BM3D outputs (keyed by content) are made once per session, not again here.
                    f"SetEnv HOME={self.home} RAY_TMPDIR={self.home / 'tmp'} LDCT_HOME={os.environ['LDCT_HOME']}",
                    "",
                ]
            )
        )
        if not Path("/run/sshd").is_dir():
            Path("/run/sshd").mkdir(mode=0o755)
            self.made_run_sshd = True
        self.unshare = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
             "/usr/sbin/sshd", "-D", "-e", "-f", str(sshd_dir / "sshd_config")],
            stdout=open(sshd_dir / "sshd.log", "w"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.time() + 30
        while True:
            probe = subprocess.run([*self.ssh_base(), "true"], capture_output=True, text=True, timeout=30)
            if probe.returncode == 0:
                return
            assert self.unshare.poll() is None, (sshd_dir / "sshd.log").read_text()
            if time.time() > deadline:
                raise AssertionError(f"cannot ssh in: {probe.stderr}\n{(sshd_dir / 'sshd.log').read_text()}")
            time.sleep(0.5)

    def ssh_base(self) -> list[str]:
        return [
            "ssh", "-i", str(self.key),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", f"ProxyCommand=nc 127.0.0.1 {self.port}",
            f"{self.user}@127.0.0.1",
        ]  # fmt: skip

    def head(self, command: str) -> subprocess.CompletedProcess:
        """A command on the head, in the cluster's PID namespace."""
        return subprocess.run([*self.ssh_base(), command], capture_output=True, text=True, timeout=60)

    def keep_logs(self) -> None:
        """Copy what explains a failure out of the test's tree (which is deleted) and say where:
        the launcher's output, sshd's log, the head's Ray session logs (jobs' drivers included)."""
        kept = Path(tempfile.mkdtemp(prefix="ldct-launch-failed-"))
        for source in (self.base / "launch.log", self.base / "sshd" / "sshd.log"):
            if source.is_file():
                shutil.copy(source, kept / source.name)
        sessions = self.home / "tmp" / "ray"
        for logs in sessions.glob("session_*/logs"):
            if not logs.parent.is_symlink():
                shutil.copytree(logs, kept / f"ray-{logs.parent.name}", ignore_dangling_symlinks=True)
        print(f"\n[launch test] logs kept in {kept} (not deleted):", file=sys.stderr)
        for name in ("raylet.out", "gcs_server.out", "job-driver-*.log", "monitor.log"):
            for path in sorted(kept.rglob(name))[-2:]:
                tail = path.read_text(errors="replace").splitlines()[-15:]
                print(f"--- {path}\n" + "\n".join(tail), file=sys.stderr)

    def stop(self) -> None:
        """Stop sshd by PID: it is the namespace's init, so the kernel ends whatever is left in it."""
        if self.unshare is None:
            return
        for child in psutil.Process(self.unshare.pid).children():
            child.terminate()
        try:
            self.unshare.wait(timeout=30)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(self.unshare.pid).children():
                child.kill()
            self.unshare.wait(timeout=30)
        if self.made_run_sshd:
            shutil.rmtree("/run/sshd", ignore_errors=True)


def _test_variant(site: Site, ports: dict[str, int], token: Path) -> dict:
    """cluster/local.yaml with what a one-machine test must change, and nothing else."""
    config = yaml.safe_load((ROOT / "cluster" / "local.yaml").read_text())
    config["cluster_name"] = f"ldct-ci-{site.base.name}"
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["max_workers"] = 0
    config["auth"] = {
        "ssh_user": site.user,
        "ssh_private_key": str(site.key),
        # The on-prem provider always dials port 22; this sshd listens on a free port.
        "ssh_proxy_command": f"nc 127.0.0.1 {site.port}",
    }
    assert set(config["file_mounts"]) == {"~/ldct", "~/.ray/auth_token"}
    config["file_mounts"] = {"~/ldct": str(ROOT), "~/.ray/auth_token": str(token)}
    # No pip installs and no downloads: the head uses this suite's environment (same pins), and
    # PYTHONPATH stands in for `pip install -e ~/ldct` of the synced checkout. The head shares its
    # 2 cores with the suite's other worker (a study of its own at times): worker groups get the
    # suite's start timeout (set in tests/conftest.py), not Train's 60 s.
    kept = [
        c
        for c in config["setup_commands"]
        if "pip install" not in c and "fetch_weights" not in c and "-m venv" not in c
    ]
    assert kept and all("PATH" in c for c in kept), kept
    config["setup_commands"] = [
        f"ln -sfn {sys.prefix} ~/ldct-venv",
        *kept,
        "grep -q PYTHONPATH ~/.bashrc || echo 'export PYTHONPATH=$HOME/ldct OMP_WAIT_POLICY=PASSIVE"
        f" RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S={os.environ['RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S']}'"
        " >> ~/.bashrc",
    ]

    def ports_of(command: str) -> str:
        return (
            command.replace("127.0.0.1:5000", f"127.0.0.1:{ports['mlflow']}")
            .replace("--port 5000", f"--port {ports['mlflow']}")
            .replace("--port=6379", f"--port={ports['gcs']}")
            .replace("--dashboard-port=8265", f"--dashboard-port={ports['dashboard']}")
        )

    config["head_setup_commands"] = [ports_of(c) for c in config["head_setup_commands"]]
    start = [ports_of(c) for c in config["head_start_ray_commands"]]
    # Ray's fixed default ports would collide with any other Ray on the machine.
    start[-1] += (
        f" --ray-client-server-port={ports['client']} --dashboard-agent-listen-port={ports['agent']}"
        f" --num-cpus=2"
    )
    config["head_start_ray_commands"] = start
    assert all("5000" not in c and "6379" not in c for c in config["head_setup_commands"] + start)
    return config


def _mlflow_study(uri: str, study: str) -> tuple[dict, list[dict]]:
    """The parent run of ``study`` and the trial runs nested under it, read over MLflow's REST API."""

    def post(path: str, body: dict) -> dict:
        request = urllib.request.Request(
            f"{uri}/api/2.0/mlflow/{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    with urllib.request.urlopen(
        f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ldct/{study}", timeout=30
    ) as response:
        experiment_id = json.loads(response.read())["experiment"]["experiment_id"]
    runs = post("runs/search", {"experiment_ids": [experiment_id], "max_results": 100}).get("runs", [])
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [r for r, t in zip(runs, tags, strict=True) if t.get("ldct.role") == "study"]
    assert len(parents) == 1, f"{len(parents)} parent runs for {study}"
    parent_id = parents[0]["info"]["run_id"]
    trials = [
        r
        for r, t in zip(runs, tags, strict=True)
        if t.get("ldct.role") == "trial" and t.get("mlflow.parentRunId") == parent_id
    ]
    return parents[0], trials


@pytest.fixture
def site() -> Iterator[Site]:
    if os.geteuid() != 0:
        pytest.fail(
            "tests/test_cluster_launch.py needs root: it runs a private sshd in its own PID namespace "
            "and installs openssh-server/rsync/netcat where missing (CI machines run as root)"
        )
    real_home = Path.home()
    watched = [real_home / n for n in (".bashrc", ".profile", "ray_bootstrap_config.yaml", ".ray")]
    before = {p: p.read_bytes() if p.is_file() else p.exists() for p in watched}
    # The launcher caches each config it read as /tmp/ray-config-<hash>: remove the ones it adds.
    config_caches = set(Path("/tmp").glob("ray-config-*"))
    base = Path(tempfile.mkdtemp(prefix="lcl-", dir="/tmp"))  # short: Ray's socket paths
    s = Site(base)
    try:
        s.start()
        yield s
    finally:
        s.stop()
        control = Path("/tmp") / ("ray_ssh_" + hashlib.sha256(s.user.encode()).hexdigest()[:10])
        shutil.rmtree(
            control / hashlib.sha256(f"ldct-ci-{base.name}".encode()).hexdigest()[:10], ignore_errors=True
        )
        shutil.rmtree(base, ignore_errors=True)
        for cache in set(Path("/tmp").glob("ray-config-*")) - config_caches:
            if str(base) in cache.read_text(errors="replace"):
                cache.unlink()
        after = {p: p.read_bytes() if p.is_file() else p.exists() for p in watched}
        assert after == before, (
            "the real home changed (~/.bashrc, ~/.profile, ~/ray_bootstrap_config.yaml, ~/.ray)"
        )


def test_ray_up_submit_job_down(site: Site):
    try:
        _journey(site)
    except BaseException:
        site.keep_logs()
        raise


def _journey(site: Site) -> None:
    ports = {k: _free_port() for k in ("mlflow", "gcs", "dashboard", "client", "agent")}
    log = Path(os.environ.get("LDCT_LAUNCH_LOG") or site.base / "launch.log")
    log.write_text("")
    env = {
        **os.environ,
        "HOME": str(site.client_home),
        "RAY_TMPDIR": str(site.base / "client-tmp"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    # The client's token is the one generated below, and its State API is the head's.
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "LDCT_PROFILE", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS"):  # fmt: skip
        env.pop(key, None)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    # The README's first step: the token every node and the client share.
    subprocess.run([ray_bin, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    token = site.client_home / ".ray" / "auth_token"
    config_path = site.base / "local-test.yaml"
    config_path.write_text(yaml.safe_dump(_test_variant(site, ports, token), sort_keys=False))
    mlflow_uri = f"http://127.0.0.1:{ports['mlflow']}"
    shared = site.home / "nfs"  # stands for the site's NFS share: the same path on every node

    _run([ray_bin, "up", "-y", "--no-config-cache", str(config_path)], env, 420, log)
    # Awaited by head_setup_commands: it answers as soon as `ray up` returns.
    with urllib.request.urlopen(mlflow_uri + "/health", timeout=10) as response:
        assert response.status == 200
    # Its PID (in the head's PID namespace) is where the config says; `ray down` will leave it running.
    server = site.head("tr '\\0' ' ' < /proc/$(cat ~/ldct-mlflow/server.pid)/cmdline")
    assert "mlflow server" in server.stdout, server
    assert (site.home / ".ray" / "auth_token").read_text() == token.read_text()

    # No profile by accident: on a head, without --profile or LDCT_PROFILE, the study refuses.
    refused = _run(
        [ray_bin, "exec", str(config_path), "python ~/ldct/studies/loss_weights.py"], env, 120, log, ok=False
    )
    assert "pass --profile explicitly" in refused, refused[-3000:]

    # Path 1: `ray submit` (the script is copied to the head; the package is already there).
    storage_uri = f"file://{shared}/runs"
    out = _run(
        [ray_bin, "submit", str(config_path), str(ROOT / "studies" / "loss_weights.py"), "--",
         "--profile", "smoke", "--trials", "1", "--storage", storage_uri, "--results", str(shared / "results")],
        env, 600, log,
    )  # fmt: skip
    # One trial per path: a second adds ~35 s and nothing the local study tests do not cover.
    assert "study smoke: 1/1 trials completed" in out
    parent, trials = _mlflow_study(mlflow_uri, "smoke")
    assert len(trials) == 1 and all(t["info"]["status"] == "FINISHED" for t in trials)
    # The checkout went with its .git and every tracked file: the run records the commit it ran,
    # "+dirty" exactly when this checkout has local changes (a fresh clone in CI has none).
    here = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    changed = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    )
    recorded = {t["key"]: t["value"] for t in parent["data"]["tags"]}["ldct.git_commit"]
    assert recorded == here.stdout.strip() + ("+dirty" if changed.stdout.strip() else ""), recorded
    # The Train checkpoints are under the file:// URI, i.e. on the shared path.
    checkpoints = list((shared / "runs" / "train").glob("smoke-*/checkpoint_*"))
    assert checkpoints, list((shared / "runs").rglob("*"))[:20]

    # Path 2: Ray Jobs with token auth, the same study under another name, plain-path storage.
    job_env = {**env, "RAY_AUTH_MODE": "token"}
    out = _run(
        [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{ports['dashboard']}",
         "--working-dir", str(ROOT), "--",
         "python", "studies/loss_weights.py", "--profile", "smoke", "--name", "smoke-job", "--trials", "1",
         "--storage", str(shared / "runs")],
        job_env, 600, log,
    )  # fmt: skip
    # What this path adds: token auth, --name, plain-path storage, the report's place.
    assert "study smoke-job: 1/1 trials completed" in out and "succeeded" in out
    job_parent, job_trials = _mlflow_study(mlflow_uri, "smoke-job")
    assert len(job_trials) == 1
    assert job_parent["info"]["run_id"] != parent["info"]["run_id"]
    assert list((shared / "runs" / "train").glob("smoke-job-*/checkpoint_*"))
    # The report went beside the checkpoints, not into the job's temporary working directory.
    assert (shared / "runs" / "results" / "smoke-job" / "leaderboard.md").is_file()

    # A resubmitted study name gets its next step.
    again = _run(
        [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{ports['dashboard']}",
         "--working-dir", str(ROOT), "--",
         "python", "studies/loss_weights.py", "--profile", "smoke", "--name", "smoke-job", "--trials", "1",
         "--storage", str(shared / "runs")],
        job_env, 300, log, ok=False,
    )  # fmt: skip
    assert "--name NEW" in again, again[-3000:]

    _run([ray_bin, "down", "-y", str(config_path)], env, 180, log)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", ports["gcs"]), timeout=2).close()
    # What `ray down` leaves on an on-prem head: the MLflow server (stopped here by its PID, as
    # cluster/local.yaml says) and nothing of Ray.
    left = site.head("ps -eo args=").stdout.splitlines()
    assert not [p for p in left if "ray" in p.lower() and "mlflow" not in p], left
    assert any("mlflow server" in p for p in left), left
    assert site.head("kill $(cat ~/ldct-mlflow/server.pid)").returncode == 0
    deadline = time.time() + 30
    while any("mlflow" in p for p in site.head("ps -eo args=").stdout.splitlines()):
        assert time.time() < deadline, site.head("ps -eo args=").stdout
        time.sleep(1)
