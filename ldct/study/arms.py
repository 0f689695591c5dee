"""The arms of a repeat: what each trains, so that the loss weights and the lr are never confounded.

Every arm starts from the repeated ("tuned") configuration's ``model.*``, ``loss.*`` and
``optim.*`` values and changes only what its name says; all of them keep the tuned learning rate
(matched lr) unless ``--retune-lr`` re-tunes it per arm on the validation (phantom) split:

- ``tuned``: the configuration itself (all three loss terms at its own weights).
- ``paper-matched``: the paper's loss weights (``ldct.hyperparams.PAPER_POINT``'s ``loss.*`` keys,
  λ₂ = 1) at the tuned lr. Until issue 22 the arm ``paper`` changed the weights and the lr
  together (1e-5 against a tuned 1.6e-3: 300 iterations at 1e-5 barely move the generator, so its
  "loss-weight effect" was a learning-rate effect); that name is refused.
- ``l1``: λ₃ = λ_adv = 0; ``l1+perceptual``: λ_adv = 0; ``l1+adv``: λ₃ = 0, each keeping the tuned
  arm's other weights. ``all`` (the three terms at the tuned weights) *is* the tuned arm: asking for
  it trains nothing more.
- ``redcnn``: RED-CNN (``model.arch = redcnn``, λ₃ = λ_adv = 0) with the model and optimiser
  values of the best trial of ``--redcnn-study`` if given (its own tuned lr), else the profile's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ldct.config import Config, to_flat
from ldct.errors import LdctError
from ldct.hyperparams import LAMBDA_L1, PAPER_POINT

TUNED_ARM = "tuned"
PAPER_MATCHED_ARM = "paper-matched"
REDCNN_ARM = "redcnn"
ALL_ARM = "all"  # the three loss terms at the tuned weights: the tuned arm itself
# Source keys that define "the configuration"; everything else is the profile's budget and data.
CONFIG_SECTIONS = ("model.", "loss.", "optim.")
# Arm -> the loss weights it sets on top of the tuned configuration.
ABLATIONS: dict[str, dict[str, float]] = {
    "l1": {"loss.lambda_perceptual": 0.0, "loss.lambda_adv": 0.0},
    "l1+perceptual": {"loss.lambda_adv": 0.0},
    "l1+adv": {"loss.lambda_perceptual": 0.0},
}
ALSO_CHOICES = (PAPER_MATCHED_ARM, *ABLATIONS, ALL_ARM, REDCNN_ARM)
# Retired arm names -> why, and what to ask for instead.
RETIRED = {
    "paper": "the arm 'paper' changed the loss weights and the learning rate together (a learning-rate "
    "effect at the CPU budget); use --also paper-matched (the paper's λ's at the tuned lr), and "
    "--retune-lr to give every arm its own best lr"
}
# --retune-lr: each arm's lr times these, the best by the validation metric at the fixed budget.
LR_FACTORS = (1 / 3, 1.0, 3.0)

LABELS = {
    TUNED_ARM: "tuned (L1 + perceptual + adversarial)",
    PAPER_MATCHED_ARM: "paper λ's at the tuned lr",
    "l1": "L1 only (λ₃ = λ_adv = 0)",
    "l1+perceptual": "L1 + perceptual (λ_adv = 0)",
    "l1+adv": "L1 + adversarial (λ₃ = 0)",
    REDCNN_ARM: "RED-CNN (L1 only)",
}


class ArmError(LdctError, ValueError):
    """An unknown or retired arm name in ``--also``."""


def parse_also(values: Sequence[str]) -> list[str]:
    """``--also`` values (repeatable, comma-separated) -> extra arm names, in the order of
    :data:`ALSO_CHOICES`; ``all`` maps to the tuned arm (nothing extra), an unknown name raises."""
    names = [v.strip() for value in values for v in value.split(",") if v.strip()]
    for name in names:
        if name in RETIRED:
            raise ArmError(f"--also {name}: {RETIRED[name]}")
        if name not in ALSO_CHOICES:
            raise ArmError(f"--also {name}: unknown arm; choose from {', '.join(ALSO_CHOICES)}")
    return [a for a in ALSO_CHOICES if a in names and a != ALL_ARM]


def configuration(source: dict[str, Any]) -> dict[str, Any]:
    """The ``model.*``, ``loss.*`` and ``optim.*`` values of a source (study trial or version)."""
    return {k: v for k, v in source.items() if k.startswith(CONFIG_SECTIONS)}


def build_arms(
    base: Config,
    source: dict[str, Any],
    also: Sequence[str] = (),
    redcnn_source: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Arm name -> the flat config values it sets on top of the profile ``base`` (tuned arm first)."""
    tuned = configuration(source)
    arms = {TUNED_ARM: tuned}
    for name in also:
        if name == PAPER_MATCHED_ARM:
            paper = {k: v for k, v in PAPER_POINT.items() if k.startswith("loss.")}
            arms[name] = {**tuned, "loss.lambda_l1": LAMBDA_L1, **paper}
        elif name in ABLATIONS:
            arms[name] = {**tuned, **ABLATIONS[name]}
        elif name == REDCNN_ARM:
            own = (
                configuration(redcnn_source)
                if redcnn_source
                else {k: v for k, v in to_flat(base).items() if k.startswith(("model.", "optim."))}
            )
            arms[name] = {
                **tuned,
                **own,
                "model.arch": "redcnn",
                "loss.lambda_perceptual": 0.0,
                "loss.lambda_adv": 0.0,
            }
        elif name != ALL_ARM:
            raise ArmError(f"unknown arm {name!r}; choose from {', '.join(ALSO_CHOICES)}")
    return arms


def lr_grid(arms: dict[str, dict[str, Any]], factors: Sequence[float] = LR_FACTORS) -> dict[str, list[float]]:
    """``--retune-lr``: each arm's candidate learning rates (its matched lr times ``factors``)."""
    return {arm: [float(values["optim.lr"]) * f for f in factors] for arm, values in arms.items()}


def with_lrs(arms: dict[str, dict[str, Any]], chosen: dict[str, float]) -> dict[str, dict[str, Any]]:
    """The arms with each one's re-tuned learning rate."""
    return {
        arm: {**values, "optim.lr": float(chosen.get(arm, values["optim.lr"]))}
        for arm, values in arms.items()
    }
