"""Signal-known-exactly detection by model observers (the FDA LCD-CT method, simplified).

Two stacks of ROIs [N, H, W] in HU, centred on where the signal is (``present``) or would be
(``absent``), and the expected signal ``signal`` [H, W] (the noise-free insert minus background).

- ``npw``: the non-prewhitening observer, template = the signal: t = ⟨s, g⟩. Nothing is trained.
- ``cho``: a channelized Hotelling observer with ``channels`` Laguerre-Gauss channels
  u_j(r) = √2/a · exp(−πr²/a²) · L_j(2πr²/a²), j = 0…J−1, centred on the ROI, with width ``a`` =
  the signal's equivalent diameter (2·√(area above half its peak / π)) unless given; the
  Hotelling template w = S⁻¹ Δv̄ over the channel outputs v = Uᵀg is trained on half of the
  images of each class and tested on the other half, over ``splits`` random halvings.

For each, scores t on the test images give d′ = (t̄₊ − t̄₋) / √(½(σ₊² + σ₋²)) and the
empirical AUC (Mann-Whitney). ``auc_ci`` is the 2.5-97.5 % percentile interval of the AUC over
``bootstrap`` resamplings of the test images of each class (pooled over the splits).
For NPW on white Gaussian noise of σ, d′ = ‖s‖/σ, which is also the ideal observer's: a CHO
cannot beat it there, and with a few channels it comes close.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import eval_laguerre

from ldct.iq.nps import IQError, check_stack

DEFAULT_CHANNELS = 10


def laguerre_gauss_channels(shape: tuple[int, int], width_px: float, channels: int) -> np.ndarray:
    """[J, H·W] channel templates centred on the ROI's centre."""
    h, w = shape
    y, x = np.indices(shape, dtype=np.float64)
    r2 = (y - (h - 1) / 2) ** 2 + (x - (w - 1) / 2) ** 2
    g = 2.0 * np.pi * r2 / width_px**2
    out = [np.sqrt(2.0) / width_px * np.exp(-g / 2.0) * eval_laguerre(j, g) for j in range(channels)]
    return np.stack(out).reshape(channels, h * w)


def equivalent_diameter_px(signal: np.ndarray) -> float:
    peak = float(np.max(np.abs(signal)))
    area = float(np.count_nonzero(np.abs(signal) >= 0.5 * peak)) if peak > 0 else 0.0
    return max(2.0 * np.sqrt(area / np.pi), 1.0)


def auc(scores_present: np.ndarray, scores_absent: np.ndarray) -> float:
    """Empirical AUC (ties count one half)."""
    p = np.asarray(scores_present)[:, None]
    a = np.asarray(scores_absent)[None, :]
    return float(((p > a).sum() + 0.5 * (p == a).sum()) / (p.size * a.size))


def dprime(scores_present: np.ndarray, scores_absent: np.ndarray) -> float:
    var = 0.5 * (np.var(scores_present, ddof=1) + np.var(scores_absent, ddof=1))
    return (
        float((np.mean(scores_present) - np.mean(scores_absent)) / np.sqrt(var)) if var > 0 else float("inf")
    )


def detectability(
    present: Any,
    absent: Any,
    signal: Any,
    observer: str = "cho",
    channels: int = DEFAULT_CHANNELS,
    width_px: float | None = None,
    splits: int = 10,
    bootstrap: int = 200,
    seed: int = 0,
    names: tuple[str, str, str] = ("present", "absent", "signal"),
) -> dict[str, Any]:
    """``{"auc", "auc_ci": [lo, hi], "dprime", "observer", ...}`` for the two ROI stacks."""
    g1 = check_stack(present, names[0])
    g0 = check_stack(absent, names[1])
    s = np.asarray(signal, dtype=np.float64)
    if g1.shape[1:] != g0.shape[1:]:
        raise IQError(
            f"{names[0]} ROIs are {g1.shape[1:]} but {names[1]} ROIs are {g0.shape[1:]}: give equal ROIs"
        )
    if s.shape != g1.shape[1:]:
        raise IQError(
            f"{names[2]} is {s.shape} but the ROIs are {g1.shape[1:]}: give a template of the ROI size"
        )
    if observer not in ("npw", "cho"):
        raise IQError(f"observer must be 'npw' or 'cho', got {observer!r}")
    rng = np.random.default_rng(seed)
    f1, f0 = g1.reshape(len(g1), -1), g0.reshape(len(g0), -1)
    info: dict[str, Any] = {"observer": observer, "n_present": len(g1), "n_absent": len(g0)}
    if observer == "npw":
        template = s.ravel()
        pairs = [(f1 @ template, f0 @ template)]
    else:
        # The Hotelling template inverts a J x J covariance estimated on half of each class: with
        # J or fewer training images it is singular and the AUC meaningless.
        fewest = min(len(g1), len(g0)) // 2
        if fewest <= channels:
            raise IQError(
                f"a CHO with {channels} channels trains on half of each class ({fewest} image(s) here) and "
                f"needs more than {channels}: give at least {2 * (channels + 1)} ROIs per class, fewer "
                "--channels, or --observer npw"
            )
        a = float(width_px) if width_px else equivalent_diameter_px(s)
        u = laguerre_gauss_channels(s.shape, a, channels)
        v1, v0 = f1 @ u.T, f0 @ u.T
        info.update(channels=channels, channel_width_px=round(float(a), 3), splits=splits)
        pairs = []
        for _ in range(splits):
            i1, i0 = rng.permutation(len(v1)), rng.permutation(len(v0))
            t1, e1 = i1[: len(i1) // 2], i1[len(i1) // 2 :]
            t0, e0 = i0[: len(i0) // 2], i0[len(i0) // 2 :]
            cov = 0.5 * (np.cov(v1[t1], rowvar=False) + np.cov(v0[t0], rowvar=False))
            w = np.linalg.lstsq(cov, v1[t1].mean(0) - v0[t0].mean(0), rcond=None)[0]
            pairs.append((v1[e1] @ w, v0[e0] @ w))
    aucs = [auc(p, q) for p, q in pairs]
    boot = []
    for p, q in pairs:
        for _ in range(max(1, bootstrap // len(pairs))):
            boot.append(auc(rng.choice(p, len(p)), rng.choice(q, len(q))))
    info.update(
        auc=round(float(np.mean(aucs)), 4),
        auc_ci=[round(float(np.percentile(boot, 2.5)), 4), round(float(np.percentile(boot, 97.5)), 4)],
        dprime=round(float(np.mean([dprime(p, q) for p, q in pairs])), 4),
    )
    return info
