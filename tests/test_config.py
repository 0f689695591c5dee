"""ldct.config: strict construction, overrides and the flat round trip used by Ray and MLflow."""

from __future__ import annotations

import pytest

from ldct.config import (
    Config,
    ConfigError,
    HUNormalization,
    apply_overrides,
    from_dict,
    from_flat,
    load_config,
    replace,
    to_flat,
)


def test_from_dict_builds_typed_sections():
    cfg = from_dict(
        {
            "data": {"builtin_size": 96, "val_patients": ["PH02"], "max_air_fraction": 1},
            "optim": {"betas": [0.4, 0.8]},
            "train": {"use_gpu": True},
        },
        profile="t",
    )
    assert cfg.profile == "t" and cfg.data.builtin_size == 96
    assert cfg.data.val_patients == ("PH02",) and isinstance(cfg.data.max_air_fraction, float)
    assert cfg.optim.betas == (0.4, 0.8) and cfg.train.use_gpu is True
    assert cfg.model == Config().model  # untouched sections keep their defaults


def test_overrides_coerce_text_and_keep_the_rest():
    base = Config()
    cfg = apply_overrides(
        base,
        [
            "loss.lambda_l1=2.5",
            "train.iterations=1_000",
            "train.use_gpu=false",
            "data.test_patients=A,B",
            "optim.betas=(0.1, 0.2)",
        ],
    )
    assert cfg.loss.lambda_l1 == 2.5 and cfg.train.iterations == 1000 and cfg.train.use_gpu is False
    assert cfg.data.test_patients == ("A", "B") and cfg.optim.betas == (0.1, 0.2)
    assert cfg.loss.lambda_gp == base.loss.lambda_gp and base.loss.lambda_l1 == 1.0  # frozen original
    assert replace(base, loss={"lambda_l1": 2.5}).loss.lambda_l1 == 2.5


def test_flat_round_trip():
    cfg = apply_overrides(
        Config(profile="p"), ["data.val_patients=PH01", "model.out_indices=1,2", "study.lr_range=1e-5,1e-3"]
    )
    flat = to_flat(cfg)
    assert (
        flat["profile"] == "p"
        and flat["model.out_indices"] == [1, 2]
        and flat["data.val_patients"] == ["PH01"]
    )
    assert all(not isinstance(v, tuple) for v in flat.values())  # JSON/MLflow friendly
    back = from_flat(flat)
    assert back == cfg
    custom = from_flat({**flat, "normalization.hu_min": -1000.0, "normalization.hu_max": 2000.0})
    assert custom.normalization == HUNormalization(-1000.0, 2000.0)


@pytest.mark.parametrize(
    ("action", "match"),
    [
        (lambda: apply_overrides(Config(), ["loss.lambda_l9=1"]), r"unknown key loss\.lambda_l9"),
        (lambda: apply_overrides(Config(), ["los.lambda_l1=1"]), r"unknown section 'los'"),
        (
            lambda: apply_overrides(Config(), ["train.iterations=many"]),
            r"train\.iterations: expected an integer",
        ),
        (lambda: apply_overrides(Config(), ["train.use_gpu=maybe"]), r"train\.use_gpu: expected true/false"),
        (lambda: apply_overrides(Config(), ["optim.betas=0.5"]), r"optim\.betas: expected 2 values"),
        (lambda: apply_overrides(Config(), ["lambda_l1=1"]), r"must look like section\.key=value"),
        (lambda: from_dict({"data": {"patch_size": "big"}}), r"data\.patch_size: expected an integer"),
        (lambda: from_dict({"data": {"nope": 1}}), r"unknown key data\.nope"),
        (lambda: from_dict({"dat": {}}), r"unknown section \[dat\]"),
        (lambda: from_dict({"loss": {"lambda_l1": True}}), r"loss\.lambda_l1: expected a number"),
        (lambda: from_flat({"data.nope": 1}), r"unknown key data\.nope"),
        (lambda: from_flat({"nosection": 1}), r"has no section"),
    ],
)
def test_errors_name_the_key(action, match):
    with pytest.raises(ConfigError, match=match):
        action()


def test_load_config_from_a_toml_path(tmp_path):
    good = tmp_path / "mine.toml"
    good.write_text("[data]\nbuiltin_phantoms = 2\n[train]\niterations = 3\n")
    cfg = load_config(good, ["train.iterations=5"])
    assert cfg.profile == "mine" and cfg.data.builtin_phantoms == 2 and cfg.train.iterations == 5
    bad = tmp_path / "bad.toml"
    bad.write_text("[data]\nbuiltin_phantoms = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text("[data]\nbuiltin_phantom = 2\n")
    with pytest.raises(ConfigError, match=r"typo\.toml: unknown key data\.builtin_phantom"):
        load_config(typo)
    with pytest.raises(ConfigError, match="no profile 'nonexistent-profile'"):
        load_config("nonexistent-profile")
