"""Checks across a study section's fields (each field's type is checked by its annotation)."""

from __future__ import annotations

import re
from typing import Any

from ldct.config.coerce import ConfigError

# A study endpoint's shape (ldct.study.endpoints checks the names): metric:arm-reference>=margin.
ENDPOINT = re.compile(r"[a-z0-9_]+:[a-z0-9+_.-]+-[a-z0-9+_.-]+(>=|<=)[-+]?\d+(\.\d*)?")
# A study's registration rule (ldct.study.objectives parses it): "max OBJ", "max OBJ where OBJ2 >=
# VALUE" or "max OBJ where OBJ2 >= best - DELTA" (within DELTA of the best trial's OBJ2).
SELECTION = re.compile(
    r"max (?P<goal>[a-z_]+)(?: where (?P<floor>[a-z_]+) >= (?P<best>best - )?"
    r"(?P<value>\d+(?:\.\d*)?(?:e[-+]?\d+)?))?"
)


def check_study(study: Any) -> None:
    """Endpoints, objectives, the IQ mode's realizations and the selection rule of a StudyConfig."""
    for text in (study.primary_endpoint, *study.secondary_endpoints):
        if not ENDPOINT.fullmatch(text):
            raise ConfigError(
                f"study endpoint {text!r}: expected METRIC:ARM-REFERENCE>=MARGIN (or <=MARGIN), "
                "e.g. psnr_body:tuned-ldct>=4.0"
            )
    named = list(study.objectives)
    if len(set(named)) != len(named) or not 1 <= len(named) <= 2:
        raise ConfigError(f"study.objectives {named}: one or two different names of psnr_body, lcd_auc, fps")
    if "psnr_body" not in named:
        raise ConfigError(
            f"study.objectives {named}: psnr_body is always one of them (ASHA stops trials on it, "
            "the default rule registers by it); for another, set [psnr_body, NAME] and "
            "study.selection = 'max NAME'"
        )
    if study.pareto and named not in (["psnr_body"], ["psnr_body", "fps"]):
        raise ConfigError(
            f"study.pareto = true means objectives [psnr_body, fps], not {named}: drop study.pareto "
            "and set study.objectives"
        )
    if study.iq_realizations < 10:
        raise ConfigError(
            f"study.iq_realizations {study.iq_realizations}: at least 10 (the observers need them)"
        )
    objectives = study.effective_objectives()
    if study.selection:
        match = SELECTION.fullmatch(study.selection.strip())
        names = {match["goal"], match["floor"]} - {None} if match else set()
        if not match or not names <= set(objectives):
            raise ConfigError(
                f"study.selection {study.selection!r}: expected 'max OBJ', 'max OBJ where OBJ2 >= VALUE' "
                f"or 'max OBJ where OBJ2 >= best - DELTA' over the study's objectives {list(objectives)}, "
                "e.g. 'max lcd_auc where psnr_body >= best - 0.5'"
            )
        if len(objectives) == 1 and study.selection.strip() != "max psnr_body":
            # One objective registers Tune's best trial; a floor here would be announced, not applied.
            raise ConfigError(
                f"study.selection {study.selection!r}: a single-objective study registers its best "
                "psnr_body trial ('max psnr_body'); a rule over another metric needs it as the second "
                "objective, e.g. study.objectives = [psnr_body, lcd_auc]"
            )


def check_train(train: Any) -> None:
    """Worker counts of a TrainConfig against its global batch."""
    if train.workers < 1:
        raise ConfigError(f"train.workers {train.workers}: at least 1")
    if not 0 <= train.min_workers <= train.workers:
        raise ConfigError(
            f"train.min_workers {train.min_workers}: 0 (a fixed group of train.workers) or 1 to "
            f"train.workers ({train.workers}) for elastic DDP"
        )
    if train.batch_size < train.workers:
        raise ConfigError(
            f"train.batch_size {train.batch_size} is smaller than train.workers {train.workers}: "
            "every worker needs at least one sample of the global batch"
        )
