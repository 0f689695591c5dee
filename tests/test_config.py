"""ldct.config: strict construction, overrides and the flat round trip used by Ray and MLflow."""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Literal

import pytest

from ldct.config import (
    SECTIONS,
    Config,
    ConfigError,
    DataConfig,
    HUNormalization,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    from_flat,
    list_profiles,
    load_config,
    replace,
    to_flat,
)
from ldct.errors import LdctError


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


def _literal_fields() -> list[tuple[str, str, tuple]]:
    found = []
    for section, cls in SECTIONS.items():
        for key, hint in typing.get_type_hints(cls).items():
            if typing.get_origin(hint) is Literal:
                found.append((section, key, typing.get_args(hint)))
    return found


LITERAL_VALUES = [(s, k, v) for s, k, allowed in _literal_fields() for v in allowed]


def test_enum_like_fields_are_literals():
    # The sets their consumers branch on (training.engine PRECISIONS, the schedule, the debug
    # hooks, data.patches.SAMPLINGS, losses._VGG_CFGS, sync_bn); a field missing here would
    # again take any string and fail only inside a Ray worker.
    assert {f"{s}.{k}": allowed for s, k, allowed in _literal_fields()} == {
        "data.patch_sampling": ("slice", "area"),
        "data.window": ("auto", "soft_tissue", "brain"),
        "loss.perceptual_net": ("vgg11", "vgg13", "vgg16", "vgg19"),
        "optim.schedule": ("constant", "warmup_cosine"),
        "train.precision": ("auto", "fp16", "fp32"),
        "train.sync_bn": ("auto", "on", "off"),
        "train.debug_nan_loss": ("loss_g", "loss_critic"),
        "train.debug_nan_value": ("nan", "inf"),
        "study.iq": ("off", "fast"),
    }


@pytest.mark.parametrize(("section", "key", "value"), LITERAL_VALUES)
def test_every_allowed_value_is_accepted_every_way(section, key, value):
    ways = [
        from_dict({section: {key: value}}),
        apply_overrides(Config(), [f"{section}.{key}={value}"]),
        from_flat({**to_flat(Config()), f"{section}.{key}": value}),
        replace(Config(), **{section: {key: value}}),
    ]
    direct = dataclasses.replace(getattr(Config(), section), **{key: value})
    assert [getattr(getattr(c, section), key) for c in ways] + [getattr(direct, key)] == [value] * 5


def _not_one_of(key: str, value: str) -> str:
    section, name = key.split(".")
    allowed = typing.get_args(typing.get_type_hints(SECTIONS[section])[name])
    return re.escape(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")


def test_bad_enum_in_a_profile_names_key_value_and_allowed(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\niterations = 3\nprecision = "fp64"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: " + _not_one_of("train.precision", "fp64")):
        load_config(bad)
    assert _not_one_of("train.precision", "fp64").endswith(re.escape("'auto', 'fp16', 'fp32'"))


@pytest.mark.parametrize(
    ("action", "key", "value"),
    [
        (lambda: apply_overrides(Config(), ["optim.schedule=cosine"]), "optim.schedule", "cosine"),
        (lambda: apply_overrides(Config(), ["train.precision=FP16"]), "train.precision", "FP16"),
        (lambda: from_flat({**to_flat(Config()), "train.sync_bn": "yes"}), "train.sync_bn", "yes"),
        (lambda: from_flat({"data.patch_sampling": "pixels"}), "data.patch_sampling", "pixels"),
        (lambda: replace(Config(), loss={"perceptual_net": "resnet50"}), "loss.perceptual_net", "resnet50"),
        (lambda: dataclasses.replace(Config().train, precision="fp64"), "train.precision", "fp64"),
        (lambda: TrainConfig(debug_nan_value="NaN"), "train.debug_nan_value", "NaN"),
        (lambda: DataConfig(patch_sampling="pixel"), "data.patch_sampling", "pixel"),
    ],
)
def test_bad_enum_value_names_key_value_and_allowed(action, key, value):
    with pytest.raises(ConfigError, match=_not_one_of(key, value)):
        action()


def test_construction_checks_every_field_type():
    with pytest.raises(ConfigError, match=r"train\.iterations: expected an integer, got '5'"):
        TrainConfig(iterations="5")  # only the load paths parse text
    with pytest.raises(ConfigError, match=r"train\.use_gpu: expected true/false"):
        dataclasses.replace(Config().train, use_gpu="yes")
    with pytest.raises(ConfigError, match=r"model\.out_indices: expected a tuple"):
        ModelConfig(out_indices=[1, 2])  # a list would make the frozen config unhashable
    with pytest.raises(ConfigError, match=r"normalization\.hu_min: expected a number"):
        HUNormalization(hu_min="-1000")
    with pytest.raises(ConfigError, match=r"train: expected a TrainConfig"):
        dataclasses.replace(Config(), train=DataConfig())
    assert TrainConfig(cpus_per_worker=2).cpus_per_worker == 2  # an int is a valid float


def test_config_error_is_an_ldct_error_and_a_value_error():
    with pytest.raises(LdctError) as info:
        apply_overrides(Config(), ["train.precision=fp64"])
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


def test_replace_derives_a_changed_config():
    base = load_config("quick")
    cfg = replace(
        base,
        optim={"schedule": "constant", "betas": [0.1, 0.2], "warmup": "5"},
        train={"precision": "fp32", "iterations": 7},
        study={"extra_points": ["optim.lr=0.3,loss.lambda_l1=2"]},
    )
    assert cfg.optim.schedule == "constant" and cfg.optim.betas == (0.1, 0.2) and cfg.optim.warmup == 5
    assert cfg.train.precision == "fp32" and cfg.train.iterations == 7
    # Values are not passed through text: a comma inside a string element stays one element.
    assert cfg.study.extra_points == ("optim.lr=0.3,loss.lambda_l1=2",)
    assert cfg.profile == "quick" and cfg.data == base.data and cfg.loss == base.loss
    fresh = load_config("quick")
    assert base.optim == fresh.optim and base.train == fresh.train  # original kept
    assert hash(cfg) != hash(base)  # still frozen and hashable: lists became tuples


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (
            {"train": {"precison": "fp32"}},
            r"unknown key train\.precison; known keys of \[train\]: .*precision",
        ),
        ({"trian": {"precision": "fp32"}}, r"unknown section 'trian'"),
        ({"train": {"iterations": "many"}}, r"train\.iterations: expected an integer, got 'many'"),
        ({"train": "precision=fp32"}, r"replace: train= must be a dict"),
    ],
)
def test_replace_rejects_unknown_keys_and_bad_values(changes, match):
    base = Config()
    with pytest.raises(ConfigError, match=match):
        replace(base, **changes)
    assert base == Config()


def test_from_flat_checks_normalization_keys():
    with pytest.raises(ConfigError, match=r"unknown key normalization\.hu_mid"):
        from_flat({"normalization.hu_mid": 0.0})
    assert from_flat({"normalization.hu_min": "-1000"}).normalization.hu_min == -1000.0


def test_every_shipped_profile_loads():
    profiles = list_profiles()
    assert {"paper", "quick", "smoke", "redcnn", "pareto"} <= set(profiles)
    for name in profiles:
        cfg = load_config(name)
        assert cfg.profile == name and from_flat(to_flat(cfg)) == cfg


def test_the_retired_lambda_l1_range_is_refused_in_a_profile_and_dropped_from_a_stored_config(tmp_path):
    """λ₂ is no longer searched (issue 22): a profile or override that still sets its range is told
    what to do instead; a config stored by a former version (a checkpoint's) still loads."""
    profile = tmp_path / "old.toml"
    profile.write_text("[study]\nlambda_l1_range = [0.1, 10.0]\n")
    for load in (
        lambda: load_config(profile),
        lambda: load_config("smoke", ["study.lambda_l1_range=[0.1, 10]"]),
        lambda: replace(Config(), study={"lambda_l1_range": (0.1, 10.0)}),
    ):
        with pytest.raises(ConfigError, match=r"study\.lambda_l1_range was removed: .*lambda_adv_range"):
            load()
    stored = {**to_flat(load_config("smoke")), "study.lambda_l1_range": [0.1, 10.0]}
    assert from_flat(stored) == load_config("smoke")
    # The ratios' ranges and TPE's start-up count are study fields like any other.
    cfg = load_config("smoke", ["study.lambda_adv_range=[1e-4, 0.1]", "study.startup_trials=3"])
    assert cfg.study.lambda_adv_range == (1e-4, 0.1) and cfg.study.startup_trials == 3


def test_elastic_worker_range_is_checked_and_overrides_apply_in_any_order():
    paper = load_config("paper")
    assert paper.train.worker_range() == paper.train.workers  # fixed unless min_workers is set
    # min_workers above the current workers is fine when the same overrides raise workers.
    cfg = apply_overrides(paper, ["train.min_workers=3", "train.workers=8"])
    assert cfg.train.worker_range() == (3, 8)
    with pytest.raises(ConfigError, match=r"train.min_workers 5: 0 .* or 1 to train.workers \(4\)"):
        apply_overrides(paper, ["train.workers=4", "train.min_workers=5"])
    with pytest.raises(ConfigError, match=r"train.workers 0: at least 1"):
        apply_overrides(paper, ["train.workers=0"])
    with pytest.raises(ConfigError, match=r"batch_size 2 is smaller than train.workers 4"):
        apply_overrides(paper, ["train.workers=4", "train.batch_size=2"])
