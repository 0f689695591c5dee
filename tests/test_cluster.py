"""cluster/cluster.yaml passes Ray's own launcher validation and runs what the README says."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["provider"]["type"] == "aws"
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["node_config"]["InstanceType"].startswith("g4dn")
    assert workers["resources"]["GPU"] == 1
    head_setup = " ".join(config["head_setup_commands"])
    assert "mlflow server" in head_setup and "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in head_setup
    assert any("pip install" in c and "ldct" in c for c in config["setup_commands"])


def test_every_key_is_commented():
    # Each top-level key carries a comment line just above it (the file is the documentation).
    lines = (ROOT / "cluster" / "cluster.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith((" ", "#", "-")) and ":" in line:
            assert lines[i - 1].startswith("#"), f"top-level key without a comment: {line}"


def test_paper_profile_matches_the_paper():
    from ldct.config import load_config

    cfg = load_config("paper")
    assert cfg.model.encoder == "tf_efficientnetv2_m"
    assert (cfg.data.patch_size, cfg.train.batch_size, cfg.train.n_critic) == (64, 128, 4)
    assert (cfg.optim.lr, cfg.optim.betas) == (1e-5, (0.5, 0.9))
    assert (cfg.loss.lambda_gp, cfg.loss.lambda_l1, cfg.loss.lambda_perceptual) == (10.0, 1.0, 0.1)
    assert cfg.train.workers == 2 and cfg.train.use_gpu
