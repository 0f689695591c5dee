"""Projection-domain low-dose simulation and ``ldct data simulate``.

Low dose (docs/DESIGN.md §3): the image is converted to linear attenuation and forward projected
(parallel beam); photon counts with Poisson statistics plus Gaussian electronic noise are drawn
around the clean line integrals, and only the *difference* between the noisy and the clean line
integrals is reconstructed (filtered back-projection) and added to the image. The full-dose target
therefore carries no reconstruction artefact of the simulator; the low-dose image differs from it
by realistic, spatially varying, correlated CT noise (streaks behind bone, more noise through the
long axis of the body).

Dose-corrected noise insertion (Yu et al. 2012; Zeng et al. 2015). A real full-dose image already
holds the noise of dose 1, with line-integral variance ``(I + s^2) / I^2`` for ``I = I0 e^-p``
counts and electronic noise ``s``. Dose ``d`` has ``(d I + s^2) / (d I)^2``. The difference is the
variance of counts at flux ``I0 d / (1 - d)`` with electronic noise ``s sqrt((1 + d) / (1 - d))``,
so that is what is inserted (:func:`insertion_flux`): the total noise is then that of dose ``d``.
Inserting at ``I0 d`` instead would give ``1 + 1/d`` times the dose-1 variance (an effective dose
of 0.2 for d = 0.25). A noise-free input (a phantom's true anatomy) is simulated directly
(``noise_free=True``) at flux ``I0 d`` with electronic noise ``s``.

Exposure control: like a scanner's tube-current modulation, the flux of a slice is scaled by
``exp(0.5 (p90 - 2.7))`` (``p90`` the 90th percentile of its line integrals through the body):
the small phantoms and CT_small keep their calibrated noise, and a 35 cm abdomen is not
photon-starved (without it, its quarter dose would be at 15 dB in the window convention).

Angular sampling: ``ceil(pi N / 2)`` views over 180 degrees for an N-pixel image (the Nyquist
rate of parallel-beam CT), so the noise has no view-aliasing streaks. ``i0`` is the flux per ray
at the reference sampling of 180 views; with V views each view gets ``i0 * 180 / V`` photons, so
the dose, and the image noise level, do not depend on the angular sampling.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import generate_uid

import ldct
from ldct.data.dicom import DicomError, FrameGeometry, _dcmread, read_frames
from ldct.data.sources import Source, find_sources
from ldct.data.writer import ct_slice, derived_series_number, hu_to_stored, mark_derived, output_syntax, save

# Linear attenuation of water at the ~70 keV effective energy of a 120 kVp spectrum [1/mm].
MU_WATER_PER_MM = 0.0192
I0_FULL_DOSE = 1.5e5
# Standard deviation of the detector's electronic noise, in photon counts per reading.
ELECTRONIC_NOISE = 10.0
# The view count at which i0 is defined (see the module docstring).
REFERENCE_VIEWS = 180
# Reconstruction filter of the noise image. At 0.7 mm pixels a soft-tissue kernel such as the
# Mayo data's B30 has little response left at Nyquist, which a Hann-windowed ramp mimics.
FBP_FILTER = "hann"
# Exposure control: the flux of a slice scales with exp(AEC_STRENGTH (p90 - AEC_REFERENCE_P)), p90
# the 90th percentile of its line integrals through the body; the reference is the phantoms' (and
# CT_small's) ~2.7, so their calibrated noise stays. Strength 0.5: like clinical exposure control,
# a large patient gets more photons but still more noise (full compensation, strength 1, put the
# 35 cm abdomen 3 dB *less* noisy than the small phantoms; none, 0, photon-starved it at 15 dB).
AEC_REFERENCE_P = 2.7
AEC_STRENGTH = 0.5
INSERTION_METHOD = (
    "projection-domain noise insertion for a full-dose input (Yu et al. 2012): Poisson counts at "
    "flux I0*d/(1-d) per ray, electronic noise E*sqrt((1+d)/(1-d)), FBP of the noisy minus clean "
    "line integrals added to the input; ceil(pi*N/2) views, flux per view I0*180/views; exposure "
    "control flux x exp(0.5 (p90 - 2.7))"
)


def views_for(n: int) -> int:
    """Views over 180 degrees for an N-pixel image: ceil(pi N / 2)."""
    return int(math.ceil(math.pi * n / 2.0))


def insertion_flux(dose: float, i0: float, electronic_noise: float, noise_free: bool) -> tuple[float, float]:
    """(flux per ray, electronic noise std) whose noise, added to the input, gives dose ``dose``."""
    if noise_free:
        return i0 * dose, electronic_noise
    return i0 * dose / (1.0 - dose), electronic_noise * math.sqrt((1.0 + dose) / (1.0 - dose))


# --------------------------------------------------------------------------- projection


def hu_to_mu(hu: np.ndarray) -> np.ndarray:
    """HU -> linear attenuation [1/mm]; below -1000 HU (padding, noise in air) clipped to 0."""
    return np.maximum(MU_WATER_PER_MM * (1.0 + np.asarray(hu, dtype=np.float64) / 1000.0), 0.0)


def _line_integrals(mu_px: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Line integrals [D, A] of a square image of per-pixel attenuation, on the detector grid of
    ``skimage.transform.radon(circle=False)`` (D = padded diagonal, centre D // 2), for the
    angles ``theta`` (degrees in [0, 180)).

    Only the photon statistics depend on these values (the image itself is never reconstructed
    from them), so they are computed at half resolution, at that grid's own ceil(pi N / 2)
    views, and interpolated linearly along the detector and the angle: ~8x less work than the
    full projection, and an error of a fraction of a pixel in where the noise is strongest."""
    from skimage.transform import radon

    n = mu_px.shape[0]
    d_full = n + int(np.ceil(np.sqrt(2) * n - n))
    if n < 64:
        return radon(mu_px, theta, circle=False)
    m = n + (n % 2)
    padded = np.zeros((m, m)) if m != n else mu_px
    if m != n:
        padded[:n, :n] = mu_px
    # Block sum = mean attenuation x twice the path length per coarse pixel.
    small = padded.reshape(m // 2, 2, m // 2, 2).mean(axis=(1, 3)) * 2.0
    coarse = min(len(theta), views_for(m // 2))
    sino = radon(small, np.linspace(0.0, 180.0, coarse, endpoint=False), circle=False)  # [Ds, Ac]
    ds = sino.shape[0]
    # Along the detector: full-resolution bins sit at half-bin steps of the coarse detector.
    pos = ds // 2 + (np.arange(d_full) - d_full // 2) / 2.0
    inside = (pos >= 0) & (pos <= ds - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, ds - 2)
    f = (pos - lo)[:, None]
    det = np.where(inside[:, None], sino[lo] * (1 - f) + sino[lo + 1] * f, 0.0)  # [D, Ac]
    # Along the angle, periodic: the view at 180 degrees is the one at 0 mirrored on the detector.
    centre = d_full // 2
    mirror = 2 * centre - np.arange(d_full)
    ok = (mirror >= 0) & (mirror < d_full)
    wrap = np.where(ok, det[np.clip(mirror, 0, d_full - 1), 0], 0.0)
    ext = np.concatenate([det, wrap[:, None]], axis=1)  # [D, Ac + 1]
    t = np.asarray(theta, float) / (180.0 / coarse)
    j = np.clip(np.floor(t).astype(int), 0, coarse - 1)
    g = t - j
    return ext[:, j] * (1 - g) + ext[:, j + 1] * g


def exposure_factor(line_integrals: np.ndarray) -> float:
    """Flux multiplier of exposure control for a slice with these line integrals."""
    body = line_integrals[line_integrals > 0.1]
    if body.size == 0:
        return 1.0
    return float(np.exp(AEC_STRENGTH * (np.percentile(body, 90) - AEC_REFERENCE_P)))


def simulate_low_dose(
    image_hu: np.ndarray,
    dose: float,
    rng: np.random.Generator,
    i0: float = I0_FULL_DOSE,
    electronic_noise: float = ELECTRONIC_NOISE,
    pixel_size_mm: float = 0.7,
    views: int | None = None,
    filter_name: str = FBP_FILTER,
    noise_free: bool = False,
) -> np.ndarray:
    """Dose-``dose`` version (float32 HU) of a slice: image + FBP(noisy - clean line integrals).

    By default ``image_hu`` is a full-dose scan that already holds dose-1 noise, and only the
    missing noise is inserted (dose 1 returns the image unchanged). ``noise_free=True``: the image
    is the true anatomy, simulated directly at dose ``dose``. ``i0`` is the full-dose flux per ray
    at 180 views; ``views`` defaults to ceil(pi N / 2). The image may be non-square; it is padded
    with air for the projection.
    """
    from skimage.transform import iradon

    image_hu = np.asarray(image_hu, dtype=np.float32)
    if image_hu.ndim != 2:
        raise ValueError(f"simulate_low_dose expects one [H, W] slice, got shape {image_hu.shape}")
    if not 0 < dose <= 1:
        raise ValueError(f"dose must be a fraction of the full dose in (0, 1], got {dose}")
    if not pixel_size_mm > 0:
        raise ValueError(f"pixel_size_mm must be positive, got {pixel_size_mm}")
    if dose == 1.0 and not noise_free:
        return image_hu.copy()  # it already is a full-dose image
    h, w = image_hu.shape
    n = max(h, w)
    views = views_for(n) if views is None else int(views)
    flux, sigma_e = insertion_flux(dose, i0, electronic_noise, noise_free)
    mu_px = np.zeros((n, n))
    mu_px[:h, :w] = hu_to_mu(image_hu) * pixel_size_mm
    theta = np.linspace(0.0, 180.0, views, endpoint=False)
    p = _line_integrals(mu_px, theta)
    flux *= REFERENCE_VIEWS / views * exposure_factor(p)

    expected = flux * np.exp(-p)
    counts = rng.poisson(expected).astype(np.float64)
    if sigma_e > 0:
        counts += rng.normal(0.0, sigma_e, size=counts.shape)
    # A scanner clamps non-positive readings before the log; so do we (photon starvation).
    counts = np.maximum(counts, 1.0)
    delta_p = np.log(expected / counts)  # noisy minus clean line integral

    noise_px = iradon(delta_p, theta, output_size=n, filter_name=filter_name, circle=False)
    noise_hu = noise_px[:h, :w] / pixel_size_mm / MU_WATER_PER_MM * 1000.0
    return (image_hu + noise_hu).astype(np.float32)


def embed_in_body(
    hu: np.ndarray,
    pixel_size_mm: float,
    body_mm: tuple[float, float] = (160.0, 120.0),
    margin_mm: float = 15.0,
) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Place a cropped slice (CT_small is an 85 mm field) in a water-equivalent body outline,
    centred left-right with its lower (posterior) edge ``margin_mm`` inside the skin.

    The X-rays of a real scan crossed the whole body, not only the stored crop, and the noise
    depends on that path. The default body is the size of the built-in phantoms (whose noise
    level is calibrated), so CTSMALL and the phantoms share one noise level. Returns the canvas
    and the crop's location in it."""
    h, w = hu.shape
    half = np.array(body_mm) / 2.0 / pixel_size_mm  # semi-axes in pixels (x, y)
    size = int(2 * np.ceil(max(half[0], half[1], h, w) * 1.05)) + 2
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2.0
    canvas = np.where((xx / half[0]) ** 2 + (yy / half[1]) ** 2 <= 1.0, 0.0, -1000.0).astype(np.float32)
    bottom = int(round((size - 1) / 2.0 + half[1] - margin_mm / pixel_size_mm))
    top = max(bottom - h, 0)
    left = (size - w) // 2
    where = (slice(top, top + h), slice(left, left + w))
    canvas[where] = hu
    return canvas, where


# --------------------------------------------------------------------------- ldct data simulate

SIDECAR = "ldct-simulate.json"


@dataclass(frozen=True)
class _Run:
    """The settings of one :func:`simulate_tree` run."""

    src: Path
    tmp: Path  # the output tree while it is written
    dose: float
    seed: int
    i0: float
    electronic_noise: float
    skip_bad: bool
    keep_transfer_syntax: bool

    def uid(self, *parts: Any) -> str:
        # Same seed and source -> same UID; never one of the input's UIDs.
        return generate_uid(
            entropy_srcs=["ldct-simulate", str(self.seed), f"{self.dose:g}", *map(str, parts)]
        )


@dataclass(frozen=True)
class _Series:
    """The new identity of one output series pair."""

    key: str  # patient directory
    thickness: str  # "<t>mm"
    study_uid: str
    frame_uid: str
    series_uid: dict[str, str]  # "full" | "quarter" -> SeriesInstanceUID


def simulate_tree(
    in_dir: Path | str,
    out_dir: Path | str,
    dose: float = 0.25,
    seed: int = 0,
    i0: float = I0_FULL_DOSE,
    electronic_noise: float = ELECTRONIC_NOISE,
    skip_bad: bool = False,
    keep_transfer_syntax: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """``ldct data simulate``: routine-dose CT under ``in_dir`` -> Mayo-layout pairs in ``out_dir``.

    ``in_dir``: a Mayo or TCIA tree (its full-dose series are used) or any folder of CT slices
    (single-frame or Enhanced CT, compressed or not). Each series becomes
    ``OUT/<PatientID>[-S<SeriesNumber>]/{full,quarter}_<thickness>mm/<n>.IMA``: full = the input
    HU exactly, quarter = the dose-corrected noise insertion at ``dose`` with the slice's own
    pixel spacing. Every output UID is new (deterministic per seed); provenance goes into the
    quarter files' DerivationDescription and ``OUT/ldct-simulate.json``. Nothing under
    ``in_dir`` is written; ``out_dir`` must be missing or empty and is filled atomically.
    Returns the sidecar's content.
    """
    from tqdm import tqdm

    src, dst = Path(in_dir), Path(out_dir)
    _check_arguments(src, dst, dose, i0, electronic_noise)
    sources, skipped, notes = find_sources(src, skip_bad)
    provenance = {
        "tool": "ldct data simulate",
        "tool_version": ldct.__version__,
        "dose": float(dose),
        "i0": float(i0),
        "electronic_noise": float(electronic_noise),
        "seed": int(seed),
        "method": INSERTION_METHOD,
    }
    files: list[dict[str, Any]] = []
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    run = _Run(src, tmp, dose, seed, i0, electronic_noise, skip_bad, keep_transfer_syntax)
    try:
        by_series: dict[tuple[str, str], list[Source]] = {}
        for s_ in sources:
            by_series.setdefault((s_.key, s_.thickness), []).append(s_)
        bar = tqdm(total=len(sources), desc="simulate", unit="slice", disable=not progress)
        for (key, thickness), members in sorted(by_series.items()):
            _simulate_series(run, key, thickness, members, files, skipped, notes, bar)
        bar.close()
        if not files:
            raise DicomError(
                f"{src}: no slice could be simulated; first problem: {skipped[0][1] if skipped else '-'}"
            )
        sidecar = {
            **provenance,
            "input": str(src.resolve()),
            "files": files,
            "skipped": skipped,
            "notes": notes,
        }
        (tmp / SIDECAR).write_text(
            json.dumps({k: v for k, v in sidecar.items() if k != "input"}, indent=1, sort_keys=True) + "\n"
        )
        if dst.exists():
            dst.rmdir()
        os.rename(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return sidecar


def _check_arguments(src: Path, dst: Path, dose: float, i0: float, electronic_noise: float) -> None:
    if not 0 < dose < 1:
        raise ValueError(f"--dose must be a fraction of the full dose in (0, 1), got {dose}")
    if not i0 > 0 or electronic_noise < 0:
        raise ValueError(f"--i0 must be > 0 and --electronic-noise >= 0, got {i0} and {electronic_noise}")
    if not src.is_dir():
        raise DicomError(f"{src}: no such input directory; give a folder of routine-dose CT slices")
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents or d in s.parents:
        raise ValueError(
            f"output {dst} and input {src} overlap; choose an output outside the input (it is never written)"
        )
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not empty; give a new or empty output directory")


def _simulate_series(
    run: _Run,
    key: str,
    thickness: str,
    members: list[Source],
    files: list[dict[str, Any]],
    skipped: list[tuple[str, str]],
    notes: list[tuple[str, str]],
    bar: Any,
) -> None:
    """Simulate and write one output series pair; its slices are numbered along the slice normal."""
    members.sort(key=lambda m: (m.position, str(m.path), m.frame or 0))
    first = _dcmread(members[0].path, header_only=True)
    series = _Series(
        key=key,
        thickness=thickness,
        study_uid=run.uid(first.get("StudyInstanceUID", ""), key, "study"),
        frame_uid=run.uid(first.get("FrameOfReferenceUID", ""), key, thickness, "frame"),
        series_uid={kind: run.uid(key, thickness, kind, "series") for kind in ("full", "quarter")},
    )
    for n, m in enumerate(members, start=1):
        try:
            ds, [(hu, stored, g)] = read_frames(m.path, None if m.frame is None else [m.frame])
        except DicomError as exc:
            if not run.skip_bad:
                raise
            skipped.append((str(m.path), str(exc)))
            bar.update()
            continue
        files.append(_simulate_slice(run, series, m, n, ds, hu, stored, g, notes))
        bar.update()


def _simulate_slice(
    run: _Run,
    series: _Series,
    m: Source,
    n: int,
    ds: pydicom.Dataset,
    hu: np.ndarray,
    stored: np.ndarray,
    g: FrameGeometry,
    notes: list[tuple[str, str]],
) -> dict[str, Any]:
    """Write the full/quarter pair of one source slice (instance ``n``); its sidecar entry."""
    source_sop = str(ds.get("SOPInstanceUID", ""))
    digest = hashlib.sha256(f"{source_sop}\0{m.frame}\0{m.path.name}".encode()).digest()
    rng = np.random.default_rng([run.seed, int.from_bytes(digest[:8], "little")])
    spacing = float(np.mean(g.spacing))
    low = simulate_low_dose(
        hu, run.dose, rng, i0=run.i0, electronic_noise=run.electronic_noise, pixel_size_mm=spacing
    )
    signed = stored.dtype.kind == "i"
    if stored.dtype.itemsize > 2 or stored.dtype.kind not in "iu":
        raise DicomError(f"{m.path}: {stored.dtype} pixels; only 16-bit CT is supported")
    ts_in = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    ts_out, ts_note = output_syntax(ts_in, run.keep_transfer_syntax)
    if ts_note:
        notes.append((str(m.path), ts_note))
    entry = {"source": str(m.path.relative_to(run.src)), "source_sop": source_sop, "frame": m.frame}
    for kind, pixels in (
        ("full", stored.astype(np.int16 if signed else np.uint16)),
        ("quarter", hu_to_stored(low, g.slope, g.intercept, signed)),
    ):
        sop = run.uid(source_sop, m.frame, kind, "sop")
        out = _derived_slice(run, series, kind, pixels, sop, ds, g, n, m.series_number)
        rel = Path(series.key) / f"{kind}_{series.thickness}" / f"{n}.IMA"
        save(out, run.tmp / rel, ts_out)
        entry[kind] = str(rel)
        entry[f"{kind}_sop"] = sop
    return entry


def _derived_slice(
    run: _Run,
    series: _Series,
    kind: str,
    pixels: np.ndarray,
    sop: str,
    ds: pydicom.Dataset,
    g: FrameGeometry,
    n: int,
    number_in: int,
) -> pydicom.Dataset:
    """The ``kind`` ("full" | "quarter") dataset of one source slice, marked as derived."""
    source_sop = str(ds.get("SOPInstanceUID", ""))
    out = ct_slice(
        pixels,
        slope=g.slope,
        intercept=g.intercept,
        sop_uid=sop,
        series_uid=series.series_uid[kind],
        study_uid=series.study_uid,
        frame_uid=series.frame_uid,
        series_description=(
            "Full Dose Images" if kind == "full" else f"Quarter Dose Images (simulated, dose {run.dose:g})"
        ),
        series_number=number_in,
        instance=n,
        spacing=g.spacing,
        position=g.position,
        orientation=g.orientation,
        thickness=g.thickness,
        template=ds,
        image_type=[str(v) for v in (ds.get("ImageType") or ["ORIGINAL", "PRIMARY", "AXIAL"])],
    )
    derivation = f"ldct {ldct.__version__} data simulate: " + (
        "full dose, the source image's HU re-encoded"
        if kind == "full"
        else f"simulated dose {run.dose:g}, I0 {run.i0:g}, electronic noise {run.electronic_noise:g}, "
        f"seed {run.seed}; {INSERTION_METHOD}"
    )
    mark_derived(
        out,
        derivation=derivation,
        series_number=number_in if kind == "full" else derived_series_number(number_in),
        sources=[(str(ds.SOPClassUID), source_sop)],
        contribution="ldct data simulate",
    )
    if kind == "full":
        # Same pixels as the source: keep its ImageType (ORIGINAL stays ORIGINAL).
        out.ImageType = [str(v) for v in (ds.get("ImageType") or ["ORIGINAL", "PRIMARY", "AXIAL"])]
    return out
