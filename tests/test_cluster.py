"""The cluster configs pass Ray's own launcher validation and say what the README says; the
cluster-path code keeps storage as URIs, scopes MLflow to one study invocation, never picks a
profile by accident, and fails clearly where a GPU or an input is missing."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from _ray_fixtures import _free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["cluster.yaml", "local.yaml"]


def _config(name: str) -> dict:
    return yaml.safe_load((ROOT / "cluster" / name).read_text())


def _commands(config: dict) -> list[str]:
    keys = ("setup_commands", "head_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    return [c for k in keys for c in config.get(k, [])]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_passes_ray_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_config(name)))


def test_aws_config():
    config = _config("cluster.yaml")
    assert config["provider"]["type"] == "aws"
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["node_config"]["InstanceType"].startswith("g4dn")
    assert workers["resources"]["GPU"] == 1
    # No AMI id that nobody can vouch for: Ray's default applies, and the comment says how to pick one.
    assert all("ImageId" not in t["node_config"] for t in config["available_node_types"].values())
    assert "aws ssm get-parameter" in (ROOT / "cluster" / "cluster.yaml").read_text()
    # Ray's launcher gives its own role to the head only (and could not pass it on): every node
    # names one profile, whose role may pass itself (the comment says how to make it).
    head = config["available_node_types"]["head"]["node_config"]
    assert head["IamInstanceProfile"] == workers["node_config"]["IamInstanceProfile"] == {"Name": "ldct-node"}
    assert "iam:PassRole" in (ROOT / "cluster" / "cluster.yaml").read_text()
    # A missing EFS mount stops the node's setup, with what to set; nothing is hidden by `|| true`.
    efs = [c for c in config["setup_commands"] if "/mnt/efs" in c]
    assert efs and "|| true" not in efs[0] and "exit 1" in efs[0]
    # Cold spot workers boot and install before they join: trials wait for them, not 60 s.
    start = " ".join(config["head_start_ray_commands"])
    assert "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=900" in start


def test_local_config_is_on_prem():
    config = _config("local.yaml")
    assert config["provider"]["type"] == "local"
    assert "available_node_types" not in config and "head_node_type" not in config
    assert config["provider"]["head_ip"] not in config["provider"]["worker_ips"]
    assert config["auth"]["ssh_private_key"]


@pytest.mark.parametrize("name", CONFIGS)
def test_mlflow_started_by_port_probe_on_loopback(name):
    config = _config(name)
    head = " ".join(config["head_setup_commands"])
    # A pgrep of "mlflow server" matches Ray's own `bash -c '...mlflow server...'`: never started.
    assert "pgrep" not in " ".join(_commands(config))
    assert "curl -sf http://127.0.0.1:5000/health" in head and "mlflow server" in head
    assert "--host 127.0.0.1" in head and "0.0.0.0" not in " ".join(_commands(config))
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in head and "server.pid" in head
    # ...and awaited, so that a `ray submit` right after `ray up` finds it.
    assert any(c.startswith("for i in") and "exit 1" in c for c in config["head_setup_commands"])
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "RAY_AUTH_MODE=token" in start
    assert "LDCT_PROFILE=paper" in start
    assert all("RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"] if "ray start" in c)
    assert any(k.endswith(".ray/auth_token") for k in config["file_mounts"])


@pytest.mark.parametrize("name", CONFIGS)
def test_setup_installs_the_pinned_pair_and_fetches_weights(name):
    setup = " ".join(_config(name)["setup_commands"])
    assert "torch==2.14.1 torchvision==0.29.1" in setup and "pip install -q -e ~/ldct" in setup
    assert "scripts/fetch_weights.py --profile paper" in setup


@pytest.mark.parametrize(("name", "nested"), [("cluster.yaml", False), ("local.yaml", True)])
def test_every_key_is_commented(name, nested):
    # Each key carries a comment line just above it (the file is the documentation); local.yaml,
    # the one a site edits, down to every nested key (file_mounts' entries are data, not keys).
    text = (ROOT / "cluster" / name).read_text()
    lines = text.splitlines()

    def keys(node: yaml.Node, depth: int):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                yield key
                if nested and key.value != "file_mounts":
                    yield from keys(value, depth + 1)

    for key in keys(yaml.compose(text), 0):
        above = lines[key.start_mark.line - 1].strip()
        assert above.startswith("#"), (
            f"{name}:{key.start_mark.line + 1}: key {key.value!r} has no comment above"
        )


def test_paper_profile_matches_the_paper():
    from ldct.config import load_config

    cfg = load_config("paper")
    assert cfg.model.encoder == "tf_efficientnetv2_m"
    assert (cfg.data.patch_size, cfg.train.batch_size, cfg.train.n_critic) == (64, 128, 4)
    assert (cfg.optim.lr, cfg.optim.betas) == (1e-5, (0.5, 0.9))
    assert (cfg.loss.lambda_gp, cfg.loss.lambda_l1, cfg.loss.lambda_perceptual) == (10.0, 1.0, 0.1)
    assert cfg.train.workers == 2 and cfg.train.use_gpu


# ------------------------------------------------------------------------------------ storage URIs


@pytest.mark.parametrize(
    ("storage", "joined"),
    [
        ("s3://bucket/ldct-runs", "s3://bucket/ldct-runs/smoke/train"),
        ("s3://bucket/ldct-runs/", "s3://bucket/ldct-runs/smoke/train"),
        ("gs://b/p", "gs://b/p/smoke/train"),
        ("file:///mnt/nfs/runs", "file:///mnt/nfs/runs/smoke/train"),
        (
            "s3://b/p?endpoint_override=127.0.0.1:9000&scheme=http",
            "s3://b/p/smoke/train?endpoint_override=127.0.0.1:9000&scheme=http",
        ),
    ],
)
def test_storage_uris_are_joined_as_strings(storage, joined):
    from ldct.cluster import join_storage, storage_uri

    assert isinstance(storage_uri(storage), str)
    assert join_storage(storage, "smoke", "train") == joined
    # What `Path(storage) / "train"` made of it: a local directory "s3:/bucket/...".
    assert "s3:/b" not in join_storage(storage, "x").replace("s3://", "")


def test_local_storage_is_absolute(tmp_path, monkeypatch):
    from ldct.cluster import join_storage, storage_uri

    monkeypatch.chdir(tmp_path)
    assert storage_uri(None) == str(tmp_path / "runs") == storage_uri("")
    assert join_storage("rel", "a") == str(tmp_path / "rel" / "a")
    assert storage_uri("s3://bucket/x") == "s3://bucket/x"
    with pytest.raises(ValueError, match="names no bucket"):
        storage_uri("s3://")


def test_ray_job_refuses_outputs_in_its_temporary_working_dir(tmp_path, monkeypatch):
    from ldct.cluster import check_job_outputs
    from ldct.errors import TrainingError

    shared = tmp_path / "shared"
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    monkeypatch.chdir(job_dir)
    check_job_outputs(str(job_dir / "runs"), f"sqlite:///{job_dir}/mlflow.db")  # not a job: fine
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(TrainingError, match="storage.*temporary working directory.*--storage"):
        check_job_outputs(str(job_dir / "runs"), "http://127.0.0.1:5000")
    with pytest.raises(TrainingError, match="MLflow store.*--tracking-uri"):
        check_job_outputs(str(shared / "runs"), f"sqlite:///{job_dir}/mlflow.db")
    check_job_outputs(str(shared / "runs"), "http://127.0.0.1:5000")
    check_job_outputs("s3://bucket/runs", "http://127.0.0.1:5000")


# ---------------------------------------------------------------------------------------- profile


def _study_script():
    spec = importlib.util.spec_from_file_location("loss_weights", ROOT / "studies" / "loss_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_profile_by_accident(tmp_path, monkeypatch):
    study = _study_script()
    monkeypatch.delenv("LDCT_PROFILE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no ray_current_cluster here
    # A former head keeps ~/ray_bootstrap_config.yaml; it no longer means anything.
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ray_bootstrap_config.yaml").write_text("cluster_name: old\n")
    assert study.choose_profile(None) == "quick"
    assert study.choose_profile("smoke") == "smoke"
    monkeypatch.setenv("LDCT_PROFILE", "paper")  # what the cluster configs give Ray Jobs
    assert study.choose_profile(None) == "paper"
    monkeypatch.delenv("LDCT_PROFILE")
    # On a running cluster, the profile must be said.
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.0.0.10:6379")
    with pytest.raises(SystemExit, match="pass --profile explicitly"):
        study.choose_profile(None)
    assert study.choose_profile("paper") == "paper"
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    (tmp_path / "ray" / "ray_current_cluster").unlink()
    with pytest.raises(SystemExit, match="RAY_ADDRESS"):
        study.choose_profile(None)


# ---------------------------------------------------------------------------- MLflow study scoping


def test_leaderboard_and_registration_read_one_invocation(tmp_path):
    """Two invocations under one study name (a Ray Job resubmitted with fresh storage): each reads
    only the trial runs nested under its own parent run."""
    from ldct.tracking import runs as tracking_runs
    from ldct.tracking import store as tracking_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking_store.client(uri)

    def invocation(values: list[float]) -> str:
        parent = tracking_runs.start_study_run(client, "same", {"study.name": "same"}, resume=False)
        experiment = client.get_run(parent).info.experiment_id
        for i, value in enumerate(values):
            run = client.create_run(
                experiment,
                tags={tracking_store.TAG_STUDY: "same", tracking_store.TAG_ROLE: "trial", tracking_store.TAG_TRIAL: f"t{i}",
                      tracking_store.PARENT_TAG: parent, "ldct.status": "completed"},
            )  # fmt: skip
            client.log_metric(run.info.run_id, "best_val_psnr_window", value)
        return parent

    first = invocation([30.0, 31.0])
    time.sleep(0.01)
    second = invocation([40.0])
    assert len(tracking_runs.trial_runs(client, "same", first)) == 2
    assert len(tracking_runs.trial_runs(client, "same", second)) == 1
    assert len(tracking_runs.trial_runs(client, "same")) == 1  # default: the latest invocation
    best_first = tracking_runs.best_trial_run(client, "same", first)
    assert best_first.data.metrics["best_val_psnr_window"] == 31.0
    assert tracking_runs.best_trial_run(client, "same").data.metrics["best_val_psnr_window"] == 40.0
    assert tracking_runs.study_run(client, "same", first).info.run_id == first


# -------------------------------------------------------------------------------- preflight checks


def test_paper_check_reports_every_missing_input_then_fetch_from_a_share(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from ldct.config import load_config
    from ldct.study.preflight import check_inputs

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = load_config("paper")
    dead_mlflow = f"http://127.0.0.1:{_free_port()}"
    problems = check_inputs(cfg, tracking_uri=dead_mlflow, timeout=2)
    text = "\n".join(problems)
    assert len(problems) == 5, text
    for what in ("encoder tf_efficientnetv2_m", "perceptual net vgg19", "data.root /mnt/efs/mayo",
                 "YOUR-BUCKET", "unreachable"):  # fmt: skip
        assert what in text, (what, text)
    assert "scripts/fetch_weights.py --profile paper" in text

    # A site without internet: the weights on a share in the layout --export writes.
    share = tmp_path / "share"
    snapshot = share / "huggingface" / "hub" / "models--timm--tf_efficientnetv2_m.in21k_ft_in1k"
    (snapshot / "snapshots" / "abc123").mkdir(parents=True)
    (snapshot / "refs").mkdir()
    (snapshot / "refs" / "main").write_text("abc123")
    (snapshot / "snapshots" / "abc123" / "model.safetensors").write_bytes(b"x")
    (share / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    (share / "torch" / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth").write_bytes(b"x")
    spec = importlib.util.spec_from_file_location("fetch_weights", ROOT / "scripts" / "fetch_weights.py")
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    assert fetch.main(["--profile", "paper", "--from", str(share)]) == 0
    left = check_inputs(cfg, storage=str(tmp_path / "runs"), tracking_uri=dead_mlflow, timeout=2)
    assert len(left) == 2 and "data.root" in left[0] and "unreachable" in left[1], left
    assert fetch.main(["--profile", "paper", "--from", str(tmp_path / "nope")]) == 2


# ------------------------------------------------------------------------------- --on-cluster FPS


def test_validate_on_cluster_without_a_cluster_fails_at_once(tmp_path):
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    env.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("ldct-best")), "validate", "--on-cluster"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--on-cluster needs a running Ray cluster" in proc.stderr
    assert time.perf_counter() - started < 100


@pytest.mark.slow
def test_fps_task_on_a_cluster_without_gpus_fails_clearly(ray_local):
    import torch

    from ldct.cluster import RemoteError
    from ldct.config import load_config
    from ldct.registry.gpu_worker import validate_on_gpu_worker

    started = time.perf_counter()
    with pytest.raises(RemoteError, match=r"no GPU worker took the validation task within 3 s .*0 GPU"):
        validate_on_gpu_worker(
            torch.nn.Identity(), load_config("smoke"), [("torch-cuda", "fp16")], repeats=1, timeout_s=3
        )
    assert time.perf_counter() - started < 30


def test_cluster_wait_counts_live_nodes_and_names_who_joined(ray_local, capsys):
    import ray

    from ldct.cli import main as ldct_main
    from ldct.cluster import RemoteError, wait_for_nodes

    alive = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
    assert ldct_main(["cluster", "wait", "--nodes", str(len(alive)), "--timeout", "5"]) == 0
    assert f"[ldct] {len(alive)}/{len(alive)} Ray nodes alive: {alive[0]}" in capsys.readouterr().out
    lines: list[str] = []
    with pytest.raises(
        RemoteError, match=rf"only {len(alive)} of {len(alive) + 1} Ray nodes joined within 1 s"
    ):
        wait_for_nodes(len(alive) + 1, timeout_s=1, progress=lines.append, poll_s=0.2)
    assert len(lines) == 1  # the count did not change: one line, not one per poll
    assert ldct_main(["cluster", "wait", "--nodes", "0"]) == 1
    assert "count the head too" in capsys.readouterr().err


@pytest.mark.slow
def test_another_ray_on_the_machine_does_not_blind_the_state_api(ray_local):
    """Train V2's placement-group cleaner asks the State API, from a Ray worker, whether a trial's
    controller still lives. Unpinned, the State API finds its cluster by scanning the machine for
    GCS processes, and a second Ray (a `ray up` head beside the suite, a second study) makes that
    scan fail. ldct's local start pins it to its own dashboard; workers inherit the pin."""
    from ray._private.services import find_gcs_addresses

    ray = ray_local
    other_tmp = Path(tempfile.mkdtemp(prefix="r2-", dir="/tmp"))  # short: Ray's socket paths
    other = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--port=0",
         "--num-cpus=1", "--include-dashboard=false"],
        env={**os.environ, "RAY_TMPDIR": str(other_tmp)},
        stdout=open(other_tmp / "start.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip

    def gcs_count() -> int:
        """What the unpinned State API sees: the GCS addresses in this machine's raylet commands."""
        find_gcs_addresses.cache_clear()
        return len(find_gcs_addresses())

    @ray.remote(num_cpus=0)
    def state_api_nodes() -> list[str]:
        from ray.util.state import list_nodes

        return sorted(n.node_id for n in list_nodes())

    try:
        deadline = time.time() + 60
        while gcs_count() < 2:
            assert other.poll() is None and time.time() < deadline, (other_tmp / "start.log").read_text()
            time.sleep(0.5)
        own = sorted(n["NodeID"] for n in ray.nodes())
        assert ray.get(state_api_nodes.remote(), timeout=60) == own
        # What the pin prevents: the same call in a worker without it.
        unpinned = state_api_nodes.options(runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": ""}})
        with pytest.raises(Exception, match="multiple active Ray instances"):
            ray.get(unpinned.remote(), timeout=60)
    finally:
        # SIGKILL, by process group: on SIGTERM `ray start --block` waits ~60 s for its children.
        os.killpg(other.pid, 9)
        other.wait(timeout=60)
        shutil.rmtree(other_tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- S3 storage, for real


@pytest.mark.slow
def test_study_on_s3_storage_keeps_checkpoints_in_the_bucket(tmp_path):
    """Ray's real S3 code against an S3 endpoint on 127.0.0.1 (moto's server): Tune state and Train
    checkpoints land in the bucket, and the best one is read back from there into MLflow."""
    import boto3

    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=open(tmp_path / "moto.log", "w"),
        stderr=subprocess.STDOUT,
    )
    # Own Ray (not the session's: its workers must see these variables) in a short temp dir.
    ray_tmp = Path(tempfile.mkdtemp(prefix="s3-", dir="/tmp"))
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "RAY_TMPDIR": str(ray_tmp),
    }
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "LDCT_PROFILE"):
        env.pop(key, None)
    try:
        s3 = None
        deadline = time.time() + 60
        while s3 is None:
            try:
                s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                                  aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
                s3.create_bucket(Bucket="ldct")
            except Exception:  # noqa: BLE001 - the server is still starting
                s3 = None
                assert time.time() < deadline and server.poll() is None, (tmp_path / "moto.log").read_text()
                time.sleep(0.5)
        proc = subprocess.run(
            [sys.executable, str(ROOT / "studies" / "loss_weights.py"), "--profile", "smoke", "--trials", "1",
             "--storage", "s3://ldct/ldct-runs", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
             "--no-report"],  # the report reads from MLflow, not from the storage under test
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "registered ldct-denoiser version" in proc.stdout
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ldct", MaxKeys=1000).get("Contents", [])]
        assert any(k.startswith("ldct-runs/train/smoke-") and k.endswith("/state.pt") for k in keys), keys
        assert any(k.startswith("ldct-runs/smoke/") for k in keys), keys
        # Nothing went to a local directory named after the URI (what Path("s3://...") made of it).
        assert not (tmp_path / "s3:").exists() and not list(tmp_path.glob("**/ldct-runs"))
        from ldct.tracking import runs as tracking_runs
        from ldct.tracking import store as tracking_store

        client = tracking_store.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
        (run,) = tracking_runs.trial_runs(client, "smoke")
        assert "ldct.artifact_error" not in run.data.tags
    finally:
        server.terminate()
        server.wait(timeout=20)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _node_env(env: dict[str, str]) -> subprocess.CompletedProcess:
    script = f'. {ROOT / "cluster" / "node_env.sh"} && echo "$LDCT_NODE_IP $GLOO_SOCKET_IFNAME $NCCL_SOCKET_IFNAME"'
    clean = {k: v for k, v in os.environ.items() if k not in ("SSH_CONNECTION", "LDCT_NODE_IP")}
    return subprocess.run(
        ["bash", "-c", script], env={**clean, **env}, capture_output=True, text=True, timeout=30
    )


def test_node_env_pins_the_address_the_launcher_reached_and_its_interface():
    # The address is sshd's view of the connection (3rd field), and gloo gets the interface that
    # carries it: on this machine 127.0.0.1 is lo's.
    done = _node_env({"SSH_CONNECTION": "10.9.8.7 50000 127.0.0.1 22"})
    assert done.returncode == 0 and done.stdout.split() == ["127.0.0.1", "lo", "lo"], done.stderr
    # A preset address wins over SSH_CONNECTION.
    done = _node_env({"SSH_CONNECTION": "10.9.8.7 50000 203.0.113.77 22", "LDCT_NODE_IP": "127.0.0.1"})
    assert done.stdout.split() == ["127.0.0.1", "lo", "lo"], done.stderr
    # An address no interface carries (TEST-NET-3), or none at all: a clear error, no Ray start.
    done = _node_env({"SSH_CONNECTION": "10.9.8.7 50000 203.0.113.77 22"})
    assert done.returncode != 0 and "no network interface" in done.stderr and "203.0.113.77" in done.stderr
    done = _node_env({})
    assert done.returncode != 0 and "set LDCT_NODE_IP" in done.stderr
    assert not done.stdout.strip()


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_local_nodes_start_ray_at_the_pinned_address(key):
    start = [c for c in _config("local.yaml")[key] if "ray start" in c]
    assert len(start) == 1
    assert ". ~/ldct/cluster/node_env.sh &&" in start[0] and "--node-ip-address=$LDCT_NODE_IP" in start[0]


def test_cluster_down_refuses_what_it_cannot_stop_before_touching_the_cluster(tmp_path):
    """`ldct cluster down` names the file and the fix, and runs no `ray down` on a config it cannot
    finish: a worker list without the `ray stop` command that would stop Ray there."""
    from ldct.cluster import RemoteError, down_cluster

    with pytest.raises(RemoteError, match=r"cannot read the cluster config .*nope\.yaml"):
        down_cluster(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: x\n")
    with pytest.raises(RemoteError, match=r"bad\.yaml is not a Ray cluster config"):
        down_cluster(bad)
    spec = yaml.safe_load((ROOT / "cluster" / "local.yaml").read_text())
    spec["worker_start_ray_commands"] = [c for c in spec["worker_start_ray_commands"] if "ray stop" not in c]
    no_stop = tmp_path / "no-stop.yaml"
    no_stop.write_text(yaml.safe_dump(spec))
    lines: list[str] = []
    with pytest.raises(RemoteError, match=r"no-stop\.yaml: worker_start_ray_commands has no `ray stop`"):
        down_cluster(no_stop, progress=lines.append)
    assert lines == []  # refused before `ray down`


def test_ray_processes_are_told_from_others():
    from ldct.cluster import _is_ray_process

    assert _is_ray_process("ray::DashboardAgent")
    assert _is_ray_process("/opt/v/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --x=1")
    assert _is_ray_process("/usr/bin/python3 /usr/lib/python3/dist-packages/ray/_private/log_monitor.py")
    assert not _is_ray_process("/usr/sbin/sshd -D")
    assert not _is_ray_process("/opt/v/bin/python /opt/v/bin/mlflow server --port 5000")


@pytest.mark.slow
def test_fps_task_that_fails_names_its_node_and_the_cause(ray_local):
    """A validation task that raises on its worker is one RemoteError line naming the node, not a
    Ray traceback. (num_gpus=0: the suite's Ray has no GPU.)"""
    import ray
    import torch

    from ldct.cluster import RemoteError
    from ldct.config import load_config
    from ldct.registry.gpu_worker import validate_on_gpu_worker

    class Cropping(torch.nn.Module):  # a generator whose output has the wrong shape
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[..., 1:, :]

    (ip,) = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    with pytest.raises(
        RemoteError, match=rf"the validation task failed on node {re.escape(ip)} .*path output has shape"
    ):
        validate_on_gpu_worker(
            Cropping(),
            load_config("smoke"),
            [("torch", "fp32")],
            repeats=1,
            size=64,
            timeout_s=120,
            num_gpus=0,
        )
