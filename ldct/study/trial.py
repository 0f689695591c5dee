"""One Tune trial = one Ray Train run with the sampled hyperparameters.

The trial is a Tune function trainable that builds a ``TorchTrainer`` (Train V2) named after the
trial id and calls ``fit()``; ``TuneReportCallback`` forwards the workers' reports to Tune
(docs/DESIGN.md §5a). A trial restarted after an interruption builds a trainer of the
same name, and Train restores it from its latest checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldct.cluster import join_storage
from ldct.config import from_flat
from ldct.study.space import CHOICE_KEY, apply_choice
from ldct.training.ray_train import build_trainer, fit


def run_trial(
    config: dict[str, Any], base: dict[str, Any], cache_dir: str, splits: dict[str, list[str]], storage: str
) -> None:
    """One Tune trial = one Ray Train run with the sampled hyperparameters."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    flat = {**base, **{k: v for k, v in config.items() if "." in k}}
    if CHOICE_KEY in config:
        flat = apply_choice(flat, str(config[CHOICE_KEY]))
    cfg = from_flat(flat)
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = build_trainer(
        cfg,
        name=f"{cfg.study.name}-{trial_id}",
        storage_path=join_storage(storage, "train"),
        cache_dir=Path(cache_dir),
        splits=splits,
        callbacks=[TuneReportCallback()],
    )
    fit(trainer)
