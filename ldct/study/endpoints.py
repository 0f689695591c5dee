"""The endpoints of a confirmatory repeat, named in the profile before the run, and their decision.

``study.primary_endpoint`` (and ``study.secondary_endpoints``) read ``METRIC:ARM-REFERENCE>=MARGIN``:
the mean over test slices of the per-slice difference ARM minus REFERENCE in METRIC (a name of
``ldct.metrics.METRIC_NAMES``), where ARM and REFERENCE are arms of the repeat (``tuned``,
``paper-matched``, ``l1``, ...) or the baselines ``ldct`` (the LDCT input) and ``bm3d`` (BM3D, σ
estimated from the input). ``>=MARGIN``: met when the mean reaches MARGIN *and* the 95 % interval's
lower bound is above 0 (ARM beats REFERENCE beyond the slice-to-slice spread); ``<=MARGIN`` is the
same for a lower-is-better metric (RMSE): mean <= MARGIN and the upper bound below 0. The issue-22
targets are the defaults: ``psnr_body:tuned-ldct>=4.0`` and ``psnr_body:tuned-bm3d>=1.0``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from ldct.config import Config
from ldct.errors import LdctError
from ldct.metrics import METRIC_NAMES

REFERENCES = ("ldct", "bm3d")
LEVEL = 0.95
_SHAPE = re.compile(r"(?P<metric>[a-z0-9_]+):(?P<pair>.+?)(?P<op>>=|<=)(?P<margin>[-+]?\d+(\.\d*)?)")


class EndpointError(LdctError, ValueError):
    """An endpoint names an unknown metric or method, or is ambiguous."""


@dataclass(frozen=True)
class Endpoint:
    text: str
    metric: str
    arm: str
    reference: str
    op: str  # ">=" or "<="
    margin: float


def parse_endpoint(text: str, methods: Sequence[str]) -> Endpoint:
    """``"psnr_body:tuned-ldct>=4.0"`` -> Endpoint; ``methods``: the repeat's arms and baselines.
    Names may hold a hyphen (``paper-matched``): the one split into two known names wins."""
    found = _SHAPE.fullmatch(text)
    if not found:
        raise EndpointError(
            f"endpoint {text!r}: expected METRIC:ARM-REFERENCE>=MARGIN, e.g. psnr_body:tuned-ldct>=4.0"
        )
    metric, pair = found["metric"], found["pair"]
    if metric not in METRIC_NAMES:
        raise EndpointError(f"endpoint {text!r}: unknown metric {metric!r}; known: {', '.join(METRIC_NAMES)}")
    splits = [
        (pair[:i], pair[i + 1 :])
        for i, c in enumerate(pair)
        if c == "-" and pair[:i] in methods and pair[i + 1 :] in methods
    ]
    if len(splits) != 1:
        raise EndpointError(
            f"endpoint {text!r}: {pair!r} must be ARM-REFERENCE over this repeat's methods "
            f"({', '.join(methods)}); add the arm with --also (bm3d: no --no-bm3d) or change study.*_endpoint(s)"
        )
    arm, reference = splits[0]
    if arm == reference:
        raise EndpointError(f"endpoint {text!r}: compares {arm!r} with itself")
    return Endpoint(text, metric, arm, reference, found["op"], float(found["margin"]))


def check_endpoints(
    cfg: Config, arms: Sequence[str], references: Sequence[str] = REFERENCES
) -> list[Endpoint]:
    """The profile's endpoints (primary first) checked against this repeat's arms and baselines,
    before any run."""
    methods = [*arms, *references]
    try:
        return [
            parse_endpoint(t, methods) for t in (cfg.study.primary_endpoint, *cfg.study.secondary_endpoints)
        ]
    except EndpointError as exc:
        raise EndpointError(f"profile {cfg.profile}: {exc}") from exc


def t_interval(values: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """Mean and two-sided Student-t interval (n - 1 degrees of freedom) of ``values``; with one
    value the bounds are nan (no spread to estimate)."""
    a = np.asarray(values, dtype=np.float64)
    n = int(a.size)
    mean = float(a.mean()) if n else math.nan
    if n < 2:
        return {
            "n": n,
            "mean": mean,
            "std": math.nan,
            "t": math.nan,
            "low": math.nan,
            "high": math.nan,
            "level": level,
        }
    std = float(a.std(ddof=1))
    t = float(stats.t.ppf(0.5 + level / 2, n - 1))
    half = t * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "t": t, "low": mean - half, "high": mean + half, "level": level}


def met(endpoint: Endpoint, interval: dict[str, Any]) -> bool:
    """Whether the target is met: mean past the margin and the interval wholly on the arm's side of 0."""
    if endpoint.op == ">=":
        return bool(interval["mean"] >= endpoint.margin and interval["low"] > 0)
    return bool(interval["mean"] <= endpoint.margin and interval["high"] < 0)
