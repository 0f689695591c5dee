"""The search space: the tuned hyperparameters' ranges, the paper's point first, extra points.

The list of tuned values is ``ldct.hyperparams.TUNED``; this module turns it into Ray Tune
distributions (log-uniform) and the points every study evaluates before TPE samples. A Pareto
study adds a categorical architecture choice (``arch_choice``).
"""

from __future__ import annotations

import math
from typing import Any

from ldct.config import Config, to_flat
from ldct.errors import LdctError
from ldct.hyperparams import PAPER_POINT, study_ranges

# λ_adv is not tuned but recorded beside the tuned values: a profile that scales it down (the CPU
# ones) runs "paper λ's", not the paper's recipe.
PAPER_RECORDED = {"loss.lambda_adv": 1.0}
# What else the paper's recipe fixes (flat config key -> the paper's value), for the label.
PAPER_RECIPE = {
    **PAPER_RECORDED,
    "model.encoder": "tf_efficientnetv2_m",
    "train.n_critic": 4,
    "train.batch_size": 128,
    "loss.perceptual_layer": 35,
    "loss.perceptual_weights": "imagenet",
}
REDCNN = "redcnn"
CHOICE_KEY = "arch_choice"  # no dot: not a config key, translated by apply_choice


class SpaceError(LdctError, ValueError):
    """``study.extra_points`` names an unknown key or a value that is not a number."""


def search_space(cfg: Config) -> dict[str, Any]:
    """Log-uniform ranges for λ₂, λ₃, λ_gp and the learning rate, from the profile."""
    from ray import tune

    space: dict[str, Any] = {
        key: tune.loguniform(low, high) for key, (low, high) in study_ranges(cfg).items()
    }
    if cfg.study.arch_choices:
        space[CHOICE_KEY] = tune.choice(list(cfg.study.arch_choices))
    return space


def first_point(cfg: Config) -> dict[str, float]:
    """The paper's values, clipped into the profile's ranges (a range may exclude them on purpose)."""
    ranges = study_ranges(cfg)
    return {k: min(max(v, ranges[k][0]), ranges[k][1]) for k, v in PAPER_POINT.items()}


def extra_points(cfg: Config) -> list[dict[str, float]]:
    """``study.extra_points``: the first point with some tuned values changed ("optim.lr=0.3")."""
    points = []
    for text in cfg.study.extra_points:
        point = dict(first_point(cfg))
        for item in (p.strip() for p in text.split(";") if p.strip()):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in PAPER_POINT or not value:
                raise SpaceError(
                    f"study.extra_points entry {text!r}: expected key=value[;key=value] over {sorted(PAPER_POINT)}"
                )
            try:
                point[key] = float(value)
            except ValueError as exc:
                raise SpaceError(f"study.extra_points entry {text!r}: {value!r} is not a number") from exc
        points.append(point)
    return points


def paper_deviations(cfg: Config) -> list[str]:
    """Where profile ``cfg`` departs from the paper's recipe beyond the tuned values."""
    flat = to_flat(cfg)
    return [
        f"{key} {flat[key]!r} (paper {value!r})" for key, value in PAPER_RECIPE.items() if flat[key] != value
    ]


def paper_label(profile: str) -> str:
    """The row label of the paper-λ trial: never "the paper", since the profile decides the rest."""
    return f"paper λ's under profile {profile}"


def is_paper_point(params: dict[str, Any], lr: float | None = None) -> bool:
    """Whether a trial's λ's (flat keys) are the paper's; ``lr``: the first point's learning rate
    (the range may clip the paper's), compared too when given."""
    expected = {k: v for k, v in PAPER_POINT.items() if k != "optim.lr"}
    if lr is not None:
        expected["optim.lr"] = lr
    try:
        return all(math.isclose(float(params[k]), v, rel_tol=1e-9) for k, v in expected.items())
    except (KeyError, TypeError, ValueError):
        return False


def apply_choice(flat: dict[str, Any], choice: str) -> dict[str, Any]:
    """Flat config values for one architecture choice (RED-CNN: its own arch, no critic)."""
    if choice == REDCNN:
        return {**flat, "model.arch": REDCNN, "loss.lambda_adv": 0.0}
    return {**flat, "model.arch": "encoder_decoder", "model.encoder": choice}


def default_choice(cfg: Any) -> str:
    """The profile's own architecture as a choice (the paper point's value of ``arch_choice``)."""
    own = REDCNN if cfg.model.arch == REDCNN else cfg.model.encoder
    choices = list(cfg.study.arch_choices)
    return own if own in choices else choices[0]
