"""The hyperparameters a study tunes: the one list every stage reads.

Each tuned value is a flat config key (``loss.lambda_l1``: what Ray, Optuna and MLflow see), the
``study.*`` field holding its search range in a profile, its symbols in run names and reports,
and the paper's value (Hojjat & Shayegan 2025), which every study evaluates first. The search
space itself (Ray Tune distributions) is built from this list in ``ldct.study.space``; MLflow run
names, registry descriptions and reports read the same list, so a fifth tuned value is one entry
here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ldct.errors import LdctError


@dataclass(frozen=True)
class Tuned:
    """One tuned hyperparameter."""

    key: str  # flat config key, e.g. "loss.lambda_l1"
    range_field: str  # the StudyConfig field holding (low, high)
    short: str  # in MLflow run names: "λ2"
    label: str  # on report axes: "λ₂ (L1)"
    paper: float  # the paper's value


TUNED: tuple[Tuned, ...] = (
    Tuned("loss.lambda_l1", "lambda_l1_range", "λ2", "λ₂ (L1)", 1.0),
    Tuned("loss.lambda_perceptual", "lambda_perceptual_range", "λ3", "λ₃ (perceptual)", 0.1),
    Tuned("loss.lambda_gp", "lambda_gp_range", "λgp", "λ_gp", 10.0),
    Tuned("optim.lr", "lr_range", "lr", "learning rate", 1e-5),
)
TUNED_PARAMS: tuple[str, ...] = tuple(t.key for t in TUNED)
# The paper's tuned values, evaluated first by every study.
PAPER_POINT: dict[str, float] = {t.key: t.paper for t in TUNED}


class RangeError(LdctError, ValueError):
    """A profile's search range is empty or not positive (all tuned values are log-scaled)."""


def study_ranges(cfg: Any) -> dict[str, tuple[float, float]]:
    """The profile's (low, high) range of each tuned hyperparameter, keyed by its flat config name."""
    ranges = {t.key: tuple(getattr(cfg.study, t.range_field)) for t in TUNED}
    for key, (low, high) in ranges.items():
        if not 0 < low < high:
            raise RangeError(f"study range for {key} must satisfy 0 < low < high, got ({low}, {high})")
    return ranges  # type: ignore[return-value]
