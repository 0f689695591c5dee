"""Where Ray runs and where a run's files go: joining or starting Ray, storage URIs, thread env.

The bottom of the stack beside ``config`` and ``metrics``: it imports Ray's core only (lazily),
never Ray Train/Tune, MLflow or any other ldct stage, so every stage above may use it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ldct.errors import LdctError, TrainingError


def storage_uri(storage: str | os.PathLike[str] | None, default: str = "runs") -> str:
    """Ray storage as one string: a URI (``s3://``, ``gs://``, ``file://``...) kept as it is, a
    local path made absolute (Ray resolves relative paths against each trial's own directory).

    Never a ``Path`` for a URI: ``Path("s3://b/x")`` is ``s3:/b/x``, a local directory.
    """
    text = os.fspath(storage) if storage else default
    if "://" in text:
        scheme, _, rest = text.partition("://")
        rest, query = rest.partition("?")[::2]
        if not rest.strip("/"):
            raise ValueError(f"storage {text!r} names no bucket or path")
        # No trailing slash, so that joins never put "//" into an object key.
        return f"{scheme}://{rest.rstrip('/')}" + (f"?{query}" if query else "")
    return str(Path(text).expanduser().resolve())


def join_storage(base: str, *parts: str) -> str:
    """``base/part/...`` for a storage URI or an absolute path, without pathlib (see storage_uri).

    A URI's query (``?endpoint_override=...``, pyarrow's filesystem options) stays at the end.
    """
    head, sep, query = storage_uri(base).partition("?")
    return "/".join([head, *(p.strip("/") for p in parts)]) + sep + query


def cpu_thread_env() -> dict[str, str]:
    """Environment for processes that run torch on shared CPU cores.

    libgomp's default is to spin waiting threads; with another busy process on 2 cores a 2-thread
    torch step then runs ~10x slower (measured: 0.10 vs 0.98 it/s for the quick profile).
    PASSIVE waiting costs nothing measurable when the cores are free.
    """
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def init_ray(num_cpus: int | None = None) -> None:
    """Join a running cluster if there is one (RAY_ADDRESS / current cluster), else start a local Ray.

    A local Ray gets its State API pinned to its own dashboard (``RAY_API_SERVER_ADDRESS``, which
    the raylet and so every worker inherit). Unpinned, Train V2's placement-group cleaner looks for
    "its" cluster by scanning the machine for GCS processes; with any other Ray on the machine (a
    second study, a test session, a `ray up` head) that scan fails with "Found multiple active Ray
    instances", and a stopped trial's placement group leaks and starves the next (docs/DESIGN.md §5a).
    """
    import ray

    if ray.is_initialized():
        return
    # The dashboard stays on: without it Train V2 cannot free a stopped trial's workers (docs/DESIGN.md §5a).
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if running_cluster() is None:
        port = _free_local_port()
        kwargs["dashboard_port"] = port
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)


def _free_local_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def root_cause(exc: BaseException) -> str:
    """The innermost message of a (Ray-wrapped) exception chain, for a one-line error."""
    text = str(exc)
    for marker in ("NonFiniteLossError", "TrainingError", "DicomError", "ConfigError"):
        if marker in text:
            line = next((ln for ln in text.splitlines()[::-1] if marker in ln), text)
            return line.strip()
    inner = exc.__cause__ or exc.__context__
    return (
        root_cause(inner)
        if inner is not None
        else text.strip().splitlines()[-1]
        if text.strip()
        else repr(exc)
    )


def in_ray_job() -> bool:
    """True in the entrypoint of a `ray job submit` (its working directory is a temporary copy)."""
    import os

    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def check_job_outputs(storage: str, tracking_uri: str) -> None:
    """Under Ray Jobs, refuse storage or an MLflow store inside the temporary working directory:
    everything written there is deleted with it (docs/DESIGN.md §5a)."""
    import os

    if not in_ray_job():
        return
    cwd = str(Path.cwd().resolve())
    for what, where, fix in (
        ("storage", storage, "--storage /shared/path or s3://bucket/prefix (or study.storage)"),
        (
            "MLflow store",
            tracking_uri.removeprefix("sqlite:///"),
            "--tracking-uri / MLFLOW_TRACKING_URI (the head's MLflow server) or study.tracking_uri",
        ),
    ):
        if "://" not in where and os.path.commonpath([cwd, where]) == cwd:
            raise TrainingError(
                f"this Ray Job would write its {what} to {where}, inside the job's temporary "
                f"working directory: give {fix}"
            )


class RemoteError(LdctError, RuntimeError):
    """No cluster to join, or no GPU worker took the task in time; the message says what to do."""


def running_cluster() -> str | None:
    """Where ``ray.init()`` would join a running cluster (RAY_ADDRESS or a local `ray start`), else None."""
    if os.environ.get("RAY_ADDRESS"):
        return f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}"
    from ray._common.utils import get_ray_address_file

    address_file = Path(get_ray_address_file(None))
    if address_file.is_file() and address_file.read_text().strip():
        return f"{address_file} ({address_file.read_text().strip()})"
    return None


# What `ldct-best validate --on-cluster` says when no cluster runs here (connect's default).
ON_CLUSTER_HINT = (
    "--on-cluster needs a running Ray cluster, and none is running here (no RAY_ADDRESS, no "
    "`ray start` on this machine): run it on the head, e.g. `ray exec cluster/cluster.yaml "
    "'ldct-best validate --on-cluster'`, or drop --on-cluster to measure on this machine"
)


def connect(no_cluster: str = ON_CLUSTER_HINT) -> None:
    """Join the running cluster; never start a local Ray (it would have no worker to wait for).
    ``no_cluster``: the error's text when none runs here, naming the caller's command."""
    import ray

    if ray.is_initialized():
        return
    if running_cluster() is None:
        raise RemoteError(no_cluster)
    ray.init(log_to_driver=True)


def wait_for_nodes(
    count: int, timeout_s: float, progress: Callable[[str], None] = print, poll_s: float = 2.0
) -> list[str]:
    """Block until ``count`` Ray nodes (the head included) are alive; returns their addresses.

    ``ray up`` returns once the head runs; the autoscaler starts the workers after it, and a
    study submitted before they join places its first trials on what is there. Reports each
    change of the count; after ``timeout_s`` raises :class:`RemoteError` naming the nodes that did
    join.
    """
    import ray

    if count < 1:
        raise ValueError(f"--nodes {count}: count the head too, at least 1")
    connect(
        "no Ray cluster runs here (no RAY_ADDRESS, no `ray start` on this machine): run it on "
        "the head, e.g. `ray exec cluster/local.yaml 'ldct cluster wait --nodes 3'`"
    )
    deadline = time.monotonic() + timeout_s
    seen: list[str] | None = None
    while True:
        alive = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
        if alive != seen:
            progress(f"[ldct] {len(alive)}/{count} Ray nodes alive: {', '.join(alive)}")
            seen = alive
        if len(alive) >= count:
            return alive
        if time.monotonic() > deadline:
            raise RemoteError(
                f"only {len(alive)} of {count} Ray nodes joined within {timeout_s:.0f} s "
                f"({', '.join(alive)}): on the head, `ray status` shows pending nodes and "
                "/tmp/ray/session_latest/logs/monitor.* why a worker did not start or join"
            )
        time.sleep(poll_s)


def check_shared_paths(paths: dict[str, str], timeout_s: float = 120.0) -> None:
    """On a cluster of several machines, refuse a local path that not every node sees.

    ``paths`` maps what a path is for (its flag, named in the error) to the path; URIs
    (``s3://...``) are skipped. Each path gets a marker file written here, and a task pinned to
    every other alive node looks for it: a path on the head's own disk is another directory on a
    worker, where the first checkpoint a training worker writes would fail ("Unable to set up
    cluster storage"), or its data loader would find no cache. Checked before the first trial,
    so a multi-node study fails in seconds, not at its end. One node: nothing to check.
    """
    import ray
    import ray.util
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # file:// is a local path too; other schemes (s3://, gs://) are shared by construction.
    local = {
        what: Path(str(p).removeprefix("file://"))
        for what, p in paths.items()
        if "://" not in str(p).removeprefix("file://")
    }
    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
    if not local or not others:
        return
    token = f".ldct-shared-{os.getpid()}-{time.time_ns()}"
    markers = {}
    for what, path in local.items():
        path.mkdir(parents=True, exist_ok=True)
        markers[what] = str(path / token)
        Path(markers[what]).write_text(socket.gethostname())

    def visible(names: dict[str, str]) -> dict[str, bool]:
        return {what: os.path.isfile(name) for what, name in names.items()}

    probe = ray.remote(num_cpus=0, max_retries=0)(visible)
    try:
        pending = {
            n["NodeManagerAddress"]: probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(markers)
            for n in others
        }
        missing = []
        for ip, ref in pending.items():
            seen = ray.get(ref, timeout=timeout_s)
            missing += [(what, ip) for what, ok in seen.items() if not ok]
    finally:
        for name in markers.values():
            Path(name).unlink(missing_ok=True)
    if missing:
        what, ip = missing[0]
        nodes = sorted({node for w, node in missing if w == what})
        raise TrainingError(
            f"{what} {local[what]} is not shared: node {', '.join(nodes)} does not see what this "
            f"node ({ray.util.get_node_ip_address()}) wrote there. Every node must see it at the "
            f"same path: {SHARED_FIX.get(what, 'put it on storage all nodes mount')}"
        )


# How to fix each path that check_shared_paths refuses (keys: the names its callers give).
SHARED_FIX = {
    "storage": "--storage /mnt/nfs/ldct-runs (a share every node mounts) or s3://bucket/prefix",
    "data.cache": "--set data.cache=/mnt/nfs/ldct-cache (and data.root) on a share every node mounts",
}


# Processes of Ray on a node, as `ps -eo args=` shows them: the raylet, GCS and Python services
# run from Ray's package directory; workers and agents rename themselves "ray::...".
def _is_ray_process(args: str) -> bool:
    return args.startswith("ray::") or any(f"{d}/ray/" in args for d in ("site-packages", "dist-packages"))


def down_cluster(config: Path, progress: Callable[[str], None] = print, settle_s: float = 30.0) -> None:
    """``ray down`` a cluster config, then stop Ray on each on-prem worker, which ``ray down`` leaves.

    Ray's local provider runs ``ray stop`` on the head only and "terminates" workers by marking
    them in its state file. A worker's raylet exits once the head's GCS is gone, but its
    dashboard and runtime-env agents and its log monitor stay (measured: still running 90 s
    later, tests/test_cluster_multinode.py). So after ``ray down`` each of ``worker_ips`` gets
    the config's own stop command (the one the launcher runs there before ``ray start``) over
    SSH with the config's user and key, and is then checked for Ray processes. Cloud providers
    terminate the machines themselves: for them this is ``ray down``. Raises
    :class:`RemoteError` naming every worker that could not be reached or still runs Ray.
    """
    import yaml

    try:
        spec = yaml.safe_load(Path(config).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RemoteError(f"cannot read the cluster config {config}: {exc}") from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("provider"), dict):
        raise RemoteError(f"{config} is not a Ray cluster config (no provider: section)")
    local = spec["provider"].get("type") == "local"
    workers = [str(ip) for ip in spec["provider"].get("worker_ips") or []] if local else []
    stop = next((c for c in spec.get("worker_start_ray_commands") or [] if "ray stop" in str(c)), None)
    if workers and stop is None:
        raise RemoteError(
            f"{config}: worker_start_ray_commands has no `ray stop` command, so there is no known "
            "way to stop Ray on its workers; add one (cluster/local.yaml starts with "
            "`~/ldct-venv/bin/ray stop`)"
        )
    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    progress(f"[ldct] ray down -y {config}")
    sys.stdout.flush()
    done = subprocess.run([ray_bin, "down", "-y", str(config)], check=False)
    if done.returncode != 0:
        raise RemoteError(f"`ray down -y {config}` failed (exit {done.returncode}); see its output above")
    if not workers:
        return
    auth = spec.get("auth") or {}
    ssh = ["ssh", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15"]  # fmt: skip
    if auth.get("ssh_private_key"):
        ssh += ["-i", str(Path(str(auth["ssh_private_key"])).expanduser()), "-o", "IdentitiesOnly=yes"]
    if auth.get("ssh_proxy_command"):
        ssh += ["-o", f"ProxyCommand={auth['ssh_proxy_command']}"]
    user = auth.get("ssh_user") or os.environ.get("USER", "root")
    failed = []
    for ip in workers:
        target = [*ssh, f"{user}@{ip}"]
        progress(f"[ldct] {ip}: {stop}")
        try:
            # `ray stop` gives its processes 16 s, then SIGKILLs them: minutes mean a hung host.
            run = subprocess.run(
                [*target, f"bash -c {shlex.quote(str(stop))}"], capture_output=True, text=True, timeout=180
            )
        except subprocess.TimeoutExpired:
            failed.append(f"{ip}: `{stop}` did not return within 180 s")
            continue
        if run.returncode != 0:
            failed.append(f"{ip}: `{stop}` failed (exit {run.returncode}): {run.stderr.strip()[-300:]}")
            continue
        plain = re.sub(r"\x1b\[[0-9;]*m", "", run.stdout + run.stderr)  # ray colours its output
        # Its summary line, without the logger's "date time WARN file:line -- " prefix.
        said = [ln.split(" -- ", 1)[-1].strip() for ln in plain.splitlines() if "stopped" in ln.lower()]
        if said:  # its first sentence: "Stopped only 1 out of 4 Ray processes within ... 16 seconds"
            progress(f"[ldct] {ip}: {said[-1].split('. ', 1)[0].rstrip('.')}")
        deadline = time.monotonic() + settle_s
        while True:
            try:
                ps = subprocess.run([*target, "ps -eo args="], capture_output=True, text=True, timeout=60)
            except subprocess.TimeoutExpired:
                ps = subprocess.CompletedProcess([], 255, "", "no answer within 60 s")
            left = [a for a in ps.stdout.splitlines() if _is_ray_process(a.strip())]
            if ps.returncode == 0 and not left:
                progress(f"[ldct] {ip}: no Ray process left")
                break
            if time.monotonic() > deadline:
                why = f"still runs {left[:3]}" if ps.returncode == 0 else f"ps failed: {ps.stderr.strip()}"
                failed.append(f"{ip}: {why} {settle_s:.0f} s after `{stop}`")
                break
            time.sleep(1)
    if failed:
        raise RemoteError(
            "Ray may still run on a worker: "
            + "; ".join(failed)
            + f". Stop it there by hand: ssh {user}@IP '{stop} --force'"
        )
