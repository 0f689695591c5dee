"""The search space: the tuned hyperparameters' ranges, the paper's point first, extra points.

The list of tuned values is ``ldct.hyperparams.TUNED``; this module turns it into an Optuna
define-by-run space (log-uniform) and the points every study evaluates before TPE samples. A
Pareto study adds a categorical architecture choice (``arch_choice``). The space is
architecture-aware: a pixel-loss architecture (RED-CNN) has no critic and no perceptual term, so
its trials search the learning rate only and train with λ₃ = λ_adv = 0, and the trial's config
(hence its MLflow params) says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ldct.config import Config, replace, to_flat
from ldct.errors import LdctError
from ldct.hyperparams import PAPER_POINT, PIXEL_LOSS_ARCHS, PIXEL_LOSS_FIXED, TUNED, study_ranges, tuned_for

# What else the paper's recipe fixes (flat config key -> the paper's value), for the label.
PAPER_RECIPE = {
    "model.encoder": "tf_efficientnetv2_m",
    "train.n_critic": 4,
    "train.batch_size": 128,
    "loss.perceptual_layer": 35,
    "loss.perceptual_weights": "imagenet",
}
REDCNN = "redcnn"
CHOICE_KEY = "arch_choice"  # no dot: not a config key, translated by apply_choice
ALL_ARCHS = "*"  # study_ranges' "every tuned value" (a Pareto study's space spans architectures)


class SpaceError(LdctError, ValueError):
    """``study.extra_points`` names an unknown key or a value that is not a number."""


def _space_arch(cfg: Config) -> str:
    return ALL_ARCHS if cfg.study.arch_choices else cfg.model.arch


@dataclass(frozen=True)
class SearchSpace:
    """The study's space as an Optuna define-by-run function (Ray's OptunaSearch calls it with
    the trial). A plain frozen dataclass, so that Tune can pickle it with its searcher.

    Returns the values it fixes rather than samples: for RED-CNN λ₃ = λ_adv = 0 (and, in a Pareto
    study, ``model.arch``/``model.encoder`` of the choice), which Tune merges into the trial's
    config, so the trial trains with them and MLflow logs them.
    """

    ranges: tuple[tuple[str, float, float], ...]  # (flat key, low, high), log-uniform
    arch: str  # the profile's model.arch
    choices: tuple[str, ...] = ()  # study.arch_choices

    def __call__(self, trial: Any) -> dict[str, Any]:
        arch, fixed = self.arch, {}
        if self.choices:
            fixed = apply_choice({}, str(trial.suggest_categorical(CHOICE_KEY, list(self.choices))))
            arch = fixed["model.arch"]
        elif arch in PIXEL_LOSS_ARCHS:
            fixed = dict(PIXEL_LOSS_FIXED)
        used = {t.key for t in tuned_for(arch)}
        for key, low, high in self.ranges:
            if key in used:
                trial.suggest_float(key, low, high, log=True)
        return fixed

    def config_keys(self) -> set[str]:
        """Every flat config key a trial's config may get from this space (logged per trial)."""
        keys = {key for key, _, _ in self.ranges}
        if self.choices:
            keys |= {"model.arch", "model.encoder", *PIXEL_LOSS_FIXED}
        elif self.arch in PIXEL_LOSS_ARCHS:
            keys |= set(PIXEL_LOSS_FIXED)
        return keys


def search_space(cfg: Config) -> SearchSpace:
    """Log-uniform ranges for λ₃/λ₂, λ_adv/λ₂, λ_gp and the learning rate (RED-CNN: lr only)."""
    ranges = tuple((k, float(lo), float(hi)) for k, (lo, hi) in study_ranges(cfg, _space_arch(cfg)).items())
    return SearchSpace(ranges, cfg.model.arch, tuple(cfg.study.arch_choices))


def study_config(cfg: Config) -> Config:
    """The config a study's trials start from: a pixel-loss architecture's (no arch_choice)
    with λ₃ = λ_adv = 0 whatever the profile says, since the study neither searches nor trains them."""
    if cfg.study.arch_choices or cfg.model.arch not in PIXEL_LOSS_ARCHS:
        return cfg
    return replace(cfg, loss={k.split(".", 1)[1]: v for k, v in PIXEL_LOSS_FIXED.items()})


def startup_trials(cfg: Config) -> int:
    """Trials before TPE models the results (``study.startup_trials``, 0 = max(2, trials // 3)).

    Optuna counts the enqueued points (the paper's, ``study.extra_points``) among them, so the
    random start-up trials are this minus those points.
    """
    return cfg.study.startup_trials or max(2, cfg.study.trials // 3)


def tpe_sampler(cfg: Config) -> Any:
    """The study's seeded TPE sampler, with its start-up sized to the budget (:func:`startup_trials`)."""
    import optuna

    return optuna.samplers.TPESampler(seed=cfg.study.seed, n_startup_trials=startup_trials(cfg))


def startup_sentence(startup: int, points: int, trials: int) -> str:
    """What a study's TPE did, for its report: after how many start-up trials, of which kind."""
    if max(startup, points) >= trials:
        return f"TPE never ran: {max(startup, points)} start-up trials ≥ the study's {trials} trials"
    return (
        f"TPE after {startup} start-up trials (the paper's point, {points - 1} extra point(s), "
        f"{max(0, startup - points)} random), then {trials - max(startup, points)} TPE trial(s)"
    )


def first_point(cfg: Config) -> dict[str, float]:
    """The paper's values, clipped into the profile's ranges (a range may exclude them on purpose),
    for the tuned values the study searches (RED-CNN: lr only)."""
    ranges = study_ranges(cfg, _space_arch(cfg))
    return {k: min(max(PAPER_POINT[k], low), high) for k, (low, high) in ranges.items()}


def first_point_of(params: dict[str, Any]) -> dict[str, float]:
    """:func:`first_point` rebuilt from a study's logged params (``study.*_range``, ``model.arch``,
    ``study.arch_choices``); a range the study did not log (an older version) is left out."""
    try:
        all_archs = bool(json.loads(params.get("study.arch_choices") or "[]"))
    except (TypeError, ValueError):
        all_archs = False
    tuned = TUNED if all_archs else tuned_for(str(params.get("model.arch", "")))
    point = {}
    for t in tuned:
        try:
            low, high = (float(v) for v in json.loads(params[f"study.{t.range_field}"]))
        except (KeyError, TypeError, ValueError):
            continue
        point[t.key] = min(max(t.paper, low), high)
    return point


def extra_points(cfg: Config) -> list[dict[str, float]]:
    """``study.extra_points``: the first point with some tuned values changed ("optim.lr=0.3")."""
    points = []
    first = first_point(cfg)
    for text in cfg.study.extra_points:
        point = dict(first)
        for item in (p.strip() for p in text.split(";") if p.strip()):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in first or not value:
                raise SpaceError(
                    f"study.extra_points entry {text!r}: expected key=value[;key=value] over {sorted(first)}"
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


def is_paper_point(params: dict[str, Any], first: dict[str, float]) -> bool:
    """Whether a trial's tuned values (flat keys) are the study's first point ``first`` (the
    paper's values clipped into the ranges: :func:`first_point`, :func:`first_point_of`)."""
    if not first:
        return False
    try:
        return all(math.isclose(float(params[k]), v, rel_tol=1e-9) for k, v in first.items())
    except (KeyError, TypeError, ValueError):
        return False


def apply_choice(flat: dict[str, Any], choice: str) -> dict[str, Any]:
    """Flat config values for one architecture choice (RED-CNN: its own arch, no critic, no
    perceptual term: λ_adv = λ₃ = 0)."""
    if choice == REDCNN:
        return {**flat, "model.arch": REDCNN, **PIXEL_LOSS_FIXED}
    return {**flat, "model.arch": "encoder_decoder", "model.encoder": choice}


def default_choice(cfg: Any) -> str:
    """The profile's own architecture as a choice (the paper point's value of ``arch_choice``)."""
    own = REDCNN if cfg.model.arch == REDCNN else cfg.model.encoder
    choices = list(cfg.study.arch_choices)
    return own if own in choices else choices[0]
