"""The hyperparameters a study tunes: the one list every stage reads.

Each tuned value is a flat config key (``loss.lambda_perceptual``: what Ray, Optuna and MLflow
see), the ``study.*`` field holding its search range in a profile, its symbols in run names and
reports, and the paper's value (Hojjat & Shayegan 2025), which every study evaluates first. The
search space itself (an Optuna define-by-run space) is built from this list in
``ldct.study.space``; MLflow run names, registry descriptions and reports read the same list, so
a fifth tuned value is one entry here.

The loss weights are searched as ratios to λ₂ (L1), which stays at the paper's 1.0: Adam's update
is invariant to a global scale of the loss, so (λ₂, λ₃, λ_adv) and (cλ₂, cλ₃, cλ_adv) train the
same network and only λ₃/λ₂ and λ_adv/λ₂ can matter. Searching λ₂ as well spent a dimension on a
direction that changes nothing but Adam's ε-regime (docs/DESIGN.md §5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ldct.errors import LdctError

# Architectures trained on a pixel loss alone: no critic, no perceptual term (RED-CNN, Chen et
# al. 2017). A study of one searches only what such a network uses (the learning rate).
PIXEL_LOSS_ARCHS = frozenset({"redcnn"})
# λ₂: fixed, so that the tuned λ₃ and λ_adv are the ratios λ₃/λ₂ and λ_adv/λ₂.
LAMBDA_L1 = 1.0


@dataclass(frozen=True)
class Tuned:
    """One tuned hyperparameter."""

    key: str  # flat config key, e.g. "loss.lambda_perceptual"
    range_field: str  # the StudyConfig field holding (low, high)
    short: str  # in MLflow run names: "λ3"
    label: str  # on report axes: "λ₃/λ₂ (perceptual)"
    paper: float  # the paper's value
    # A weight of the adversarial or perceptual training: a pixel-loss architecture neither
    # searches nor trains with it (its value there is 0, or irrelevant for λ_gp without a critic).
    gan_only: bool = False


TUNED: tuple[Tuned, ...] = (
    Tuned("loss.lambda_perceptual", "lambda_perceptual_range", "λ3", "λ₃/λ₂ (perceptual)", 0.1, True),
    Tuned("loss.lambda_adv", "lambda_adv_range", "λadv", "λ_adv/λ₂ (adversarial)", 1.0, True),
    Tuned("loss.lambda_gp", "lambda_gp_range", "λgp", "λ_gp", 10.0, True),
    Tuned("optim.lr", "lr_range", "lr", "learning rate", 1e-5),
)
TUNED_PARAMS: tuple[str, ...] = tuple(t.key for t in TUNED)
# The paper's tuned values, evaluated first by every study.
PAPER_POINT: dict[str, float] = {t.key: t.paper for t in TUNED}
# What a pixel-loss architecture trains with in place of the weights it does not search.
PIXEL_LOSS_FIXED: dict[str, float] = {"loss.lambda_perceptual": 0.0, "loss.lambda_adv": 0.0}


class RangeError(LdctError, ValueError):
    """A profile's search range is empty or not positive (all tuned values are log-scaled), or
    the study's λ₂ is not the fixed 1.0 the ratios are taken against."""


def tuned_for(arch: str) -> tuple[Tuned, ...]:
    """The tuned hyperparameters architecture ``arch`` uses (RED-CNN: the learning rate only)."""
    return tuple(t for t in TUNED if not (t.gan_only and arch in PIXEL_LOSS_ARCHS))


def study_ranges(cfg: Any, arch: str | None = None) -> dict[str, tuple[float, float]]:
    """The profile's (low, high) range of each tuned hyperparameter ``arch`` uses, keyed by its
    flat config name. ``arch``: default the profile's ``model.arch``; ``"*"``: every tuned value
    (a Pareto study's space spans architectures)."""
    if cfg.loss.lambda_l1 != LAMBDA_L1:
        raise RangeError(
            f"loss.lambda_l1 = {cfg.loss.lambda_l1:g}: a study keeps λ₂ at {LAMBDA_L1:g} and searches "
            f"λ₃ and λ_adv as ratios to it (Adam ignores a global loss scale). Set loss.lambda_l1=1 "
            f"and divide study.lambda_perceptual_range and study.lambda_adv_range by {cfg.loss.lambda_l1:g}."
        )
    tuned = TUNED if arch == "*" else tuned_for(arch or cfg.model.arch)
    ranges = {t.key: tuple(getattr(cfg.study, t.range_field)) for t in tuned}
    for key, (low, high) in ranges.items():
        if not 0 < low < high:
            raise RangeError(f"study range for {key} must satisfy 0 < low < high, got ({low}, {high})")
    return ranges  # type: ignore[return-value]
