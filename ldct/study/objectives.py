"""What a study maximises, and the rule, stated before the run, by which it registers a trial.

``study.objectives`` names one or two of:

- ``psnr_body``: the last validation's PSNR inside the body, in each slice's window (``VAL_METRIC``);
- ``lcd_auc``: the fast image-quality mode's mean NPW AUC over the CCT189-like inserts
  (``ldct.training.trial_iq``), measured after the trial's last step;
- ``fps``: the generator's 512² batch-1 FPS on the trial's device, after its last step.

One objective: TPE and ASHA on it, and the best trial is registered. Two: multi-objective TPE
(no ASHA), every trial gets its Pareto rank, and ``study.selection`` picks the one registered:
``max GOAL``, ``max GOAL where FLOOR >= VALUE`` or ``max GOAL where FLOOR >= best - DELTA``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ldct.config import Config
from ldct.config.checks import SELECTION
from ldct.training.loop import VAL_METRIC
from ldct.training.trial_iq import IQ_METRIC

METRICS = {"psnr_body": VAL_METRIC, "lcd_auc": IQ_METRIC, "fps": "fps"}
UNITS = {"psnr_body": " dB", "lcd_auc": "", "fps": " FPS"}


def objectives(cfg: Config) -> tuple[str, ...]:
    return cfg.study.effective_objectives()


def objective_metrics(cfg: Config) -> list[str]:
    """The trial metrics Optuna is told, in the order of ``study.objectives``."""
    return [METRICS[name] for name in objectives(cfg)]


def _fmt(name: str, value: float) -> str:
    digits = ".3f" if name == "lcd_auc" else ".3g" if name == "fps" else ".2f"
    return f"{value:{digits}}{UNITS[name]}"


@dataclass(frozen=True)
class Selection:
    """``max goal [where floor >= value | where floor >= best - value]``."""

    goal: str
    floor: str | None = None
    value: float = 0.0
    relative: bool = False

    @property
    def text(self) -> str:
        if self.floor is None:
            return f"max {self.goal}"
        bar = f"best - {self.value:g}" if self.relative else f"{self.value:g}"
        return f"max {self.goal} where {self.floor} >= {bar}"

    def threshold(self, rows: list[dict[str, Any]]) -> float:
        """The floor's bar over ``rows`` (a relative bar is measured from their best)."""
        if self.floor is None:
            return -math.inf
        if not self.relative:
            return self.value
        values = [r[METRICS[self.floor]] for r in rows if math.isfinite(r.get(METRICS[self.floor], math.nan))]
        return max(values) - self.value if values else math.inf

    def choose(self, rows: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str]:
        """The chosen row (None when no row meets the floor) and a sentence saying why."""
        goal, floor = METRICS[self.goal], METRICS[self.floor] if self.floor else None
        scored = [r for r in rows if math.isfinite(r.get(goal, math.nan))]
        if not scored:
            return None, f"no trial reported {self.goal}"
        bar = self.threshold(scored)
        meeting = [r for r in scored if floor is None or r.get(floor, math.nan) >= bar]
        if not meeting:
            best = max((r.get(floor, math.nan) for r in scored), default=math.nan) if floor else math.nan
            return None, (
                f"no trial met {self.floor} >= {_fmt(self.floor or self.goal, bar)} "
                f"(best {_fmt(self.floor or self.goal, best)})"
            )
        chosen = max(meeting, key=lambda r: r[goal])
        why = f"{self.goal} {_fmt(self.goal, chosen[goal])}"
        if self.floor:
            why += f", {self.floor} {_fmt(self.floor, chosen[floor])} >= {_fmt(self.floor, bar)}"
        return chosen, why


def parse_selection(text: str) -> Selection:
    match = SELECTION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"selection {text!r}: expected 'max OBJ [where OBJ2 >= [best - ]VALUE]'")
    value = float(match["value"]) if match["value"] else 0.0
    return Selection(match["goal"], match["floor"], value, bool(match["best"]))


def selection(cfg: Config) -> Selection:
    """The profile's rule; unset: ``max psnr_body`` (with FPS an objective: ``where fps >= min_fps``)."""
    if cfg.study.selection:
        return parse_selection(cfg.study.selection)
    if "fps" in objectives(cfg):
        return Selection("psnr_body", "fps", cfg.study.min_fps)
    return Selection("psnr_body")
