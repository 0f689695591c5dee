"""Image panels (LDCT / denoised / full dose / difference) for runs and reports. No Ray, no MLflow."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ldct.metrics import SOFT_TISSUE_WINDOW, body_mask, psnr_body


def save_panel(
    low_hu: np.ndarray,
    denoised_hu: np.ndarray,
    full_hu: np.ndarray,
    path: Path | str,
    title: str = "",
    window: tuple[float, float] | None = None,
) -> Path:
    """Write a 4-image PNG in ``window`` (the slice's anatomy window; default soft tissue
    [-160, 240] HU), each title giving PSNR inside the body in that window (``psnr_body``); the
    difference is denoised - full dose (±100 HU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low_hu, denoised_hu, full_hu = (
        np.asarray(a, dtype=np.float32).squeeze() for a in (low_hu, denoised_hu, full_hu)
    )
    lo, hi = window or SOFT_TISSUE_WINDOW
    mask = body_mask(full_hu)

    def psnr(image: np.ndarray) -> float:
        return float(psnr_body(image, full_hu, (lo, hi), mask)[0])

    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6), constrained_layout=True)
    panels = [
        (low_hu, f"LDCT  {psnr(low_hu):.2f} dB (body)", "gray", (lo, hi)),
        (denoised_hu, f"denoised  {psnr(denoised_hu):.2f} dB (body)", "gray", (lo, hi)),
        (full_hu, f"full dose (target) [{lo:g}, {hi:g}] HU", "gray", (lo, hi)),
        (denoised_hu - full_hu, "denoised - full dose [HU]", "coolwarm", (-100, 100)),
    ]
    for ax, (image, label, cmap, (vmin, vmax)) in zip(axes, panels, strict=True):
        shown = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(label, fontsize=10)
        ax.axis("off")
    fig.colorbar(shown, ax=axes[-1], fraction=0.046)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def iq_figure(table: dict, path: Path | str) -> Path:
    """NPS curves overlaid, TTF f50 per rod contrast, and AUC per insert with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["rows"]
    fig, (a_nps, a_ttf, a_lcd) = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    width = 0.8 / max(len(rows), 1)
    for k, (method, row) in enumerate(rows.items()):
        radial = row["nps"]["radial"]
        a_nps.plot(radial["f_per_mm"], radial["nps"], label=method)
        # None: above 0.5 up to Nyquist (no blur but the pixel's); a gap in the line says so.
        f50 = [np.nan if r["f50_per_mm"] is None else r["f50_per_mm"] for r in row["ttf"]]
        a_ttf.plot([r["rod_hu"] for r in row["ttf"]], f50, "o-", label=method)
        auc = np.array([r["auc"] for r in row["lcd"]])
        ci = np.array([r["auc_ci"] for r in row["lcd"]])
        x = np.arange(len(auc)) + (k - (len(rows) - 1) / 2) * width
        a_lcd.errorbar(x, auc, yerr=[auc - ci[:, 0], ci[:, 1] - auc], fmt="o", capsize=3, label=method)
    a_nps.set(
        xlabel="spatial frequency (mm⁻¹)", ylabel="NPS (HU²·mm²)", title="noise power spectrum", yscale="log"
    )
    a_ttf.set(
        xlabel="rod contrast (HU)", ylabel="TTF f50 (mm⁻¹)", title="sharpness by contrast", xscale="symlog"
    )
    inserts = [r["insert"] for r in next(iter(rows.values()))["lcd"]]
    a_lcd.set_xticks(range(len(inserts)), inserts)
    a_lcd.set(ylabel="AUC (95 % bootstrap)", title="low-contrast detectability", ylim=(0.45, 1.02))
    a_lcd.axhline(0.5, color="grey", lw=0.5)
    a_nps.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
