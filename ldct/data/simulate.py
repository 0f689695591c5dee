"""Projection-domain low-dose simulation, anatomical phantoms and the built-in DICOM set.

Low dose (DESIGN.md §3): the full-dose image is converted to linear attenuation, forward projected
(parallel beam), turned into photon counts with Poisson statistics at an incident flux of
``i0 × dose`` plus Gaussian electronic noise, and only the *difference* between the noisy and the
clean line integrals is reconstructed (filtered back-projection) and added to the full-dose image.
The full-dose target therefore carries no reconstruction artefact of the simulator; the low-dose
image differs from it by realistic, spatially varying, correlated CT noise (streaks behind bone,
more noise through the long axis of the body).

The built-in set is a Mayo-layout DICOM tree (``OUT/<patient>/{full,quarter}_3mm/<n>.IMA``) of
synthetic phantoms ``PH01..`` plus the real slice ``CT_small.dcm`` bundled with pydicom as
patient ``CTSMALL``, so the built-in path runs exactly the code real data takes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

# Linear attenuation of water at the ~70 keV effective energy of a 120 kVp spectrum [1/mm].
MU_WATER_PER_MM = 0.0192
I0_FULL_DOSE = 1.5e5
# Standard deviation of the detector's electronic noise, in photon counts per reading.
ELECTRONIC_NOISE = 10.0
# Parallel-beam views over 180 degrees. With I0 and the filter this fixes the noise level; 180
# views put the quarter-dose PSNR of the built-in set near the Mayo data's (~29 dB, window).
VIEWS = 180
# Reconstruction filter of the noise image. At 0.7 mm pixels a soft-tissue kernel such as the
# Mayo data's B30 has little response left at Nyquist, which a Hann-windowed ramp mimics.
FBP_FILTER = "hann"
PHANTOM_PIXEL_MM = 0.7
SLICE_THICKNESS_MM = 3.0
# Bump when the phantoms or the simulation change: built-in trees (and the caches under
# $LDCT_HOME keyed by these parameters) of another version are then regenerated.
BUILTIN_VERSION = 1
BUILTIN_MARKER = ".ldct-builtin.json"
CTSMALL = "CTSMALL"


# --------------------------------------------------------------------------- projection


def hu_to_mu(hu: np.ndarray) -> np.ndarray:
    """HU -> linear attenuation [1/mm]; below -1000 HU (padding, noise in air) clipped to 0."""
    return np.maximum(MU_WATER_PER_MM * (1.0 + np.asarray(hu, dtype=np.float64) / 1000.0), 0.0)


def _line_integrals(mu_px: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Line integrals [D, A] of a square image of per-pixel attenuation, on the detector grid of
    ``skimage.transform.radon(circle=False)`` (D = padded diagonal, centre D // 2).

    Only the photon statistics depend on these values (the image itself is never reconstructed
    from them), so they are computed at half resolution and interpolated: 4x less work, and an
    error of a fraction of a pixel in where the noise is strongest."""
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
    sino = radon(small, theta, circle=False)  # [Ds, A]
    ds = sino.shape[0]
    pos = ds // 2 + (np.arange(d_full) - d_full // 2) / 2.0
    return np.stack(
        [np.interp(pos, np.arange(ds), sino[:, a], left=0.0, right=0.0) for a in range(len(theta))], 1
    )


def simulate_low_dose(
    full_hu: np.ndarray,
    dose: float,
    rng: np.random.Generator,
    i0: float = I0_FULL_DOSE,
    electronic_noise: float = ELECTRONIC_NOISE,
    pixel_size_mm: float = PHANTOM_PIXEL_MM,
    views: int = VIEWS,
    filter_name: str = FBP_FILTER,
) -> np.ndarray:
    """Low-dose version (float32 HU) of a full-dose slice: full + FBP(noisy - clean line integrals).

    ``dose`` is the fraction of the full-dose flux ``i0`` (incident photons per ray). The image may
    be non-square; it is padded with air for the projection.
    """
    from skimage.transform import iradon

    full_hu = np.asarray(full_hu, dtype=np.float32)
    if full_hu.ndim != 2:
        raise ValueError(f"simulate_low_dose expects one [H, W] slice, got shape {full_hu.shape}")
    if not dose > 0:
        raise ValueError(f"dose must be a positive fraction of the full dose, got {dose}")
    if not pixel_size_mm > 0:
        raise ValueError(f"pixel_size_mm must be positive, got {pixel_size_mm}")
    h, w = full_hu.shape
    n = max(h, w)
    mu_px = np.zeros((n, n))
    mu_px[:h, :w] = hu_to_mu(full_hu) * pixel_size_mm
    theta = np.linspace(0.0, 180.0, views, endpoint=False)
    p = _line_integrals(mu_px, theta)

    expected = i0 * dose * np.exp(-p)
    counts = rng.poisson(expected).astype(np.float64)
    if electronic_noise > 0:
        counts += rng.normal(0.0, electronic_noise, size=counts.shape)
    # A scanner clamps non-positive readings before the log; so do we (photon starvation).
    counts = np.maximum(counts, 1.0)
    delta_p = np.log(expected / counts)  # noisy minus clean line integral

    noise_px = iradon(delta_p, theta, output_size=n, filter_name=filter_name, circle=False)
    noise_hu = noise_px[:h, :w] / pixel_size_mm / MU_WATER_PER_MM * 1000.0
    return (full_hu + noise_hu).astype(np.float32)


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


# --------------------------------------------------------------------------- phantoms


@dataclass
class PhantomSpec:
    """Random but fixed anatomy of one phantom patient; :func:`render_phantom` draws any z of it.

    Geometry is in body-relative units (u, v): the body outline is roughly the unit circle, u to the
    image's right (patient's left), v down (posterior)."""

    a: float  # body semi-axis along x, in units of the half field of view
    b: float
    cx: float
    cy: float
    harmonics: list[tuple[int, float, float]]  # (order, amplitude, phase) of the outline
    skin_mm: float
    fat_frac: float
    fat_phase: float
    muscle_frac: float
    hu: dict[str, float]
    liver: tuple[float, float, float, float, float]  # u, v, au, av, angle
    spleen: tuple[float, float, float, float, float]
    kidney_z: tuple[float, float]  # centre, half length [mm]
    kidney_uv: tuple[float, float, float, float]  # |u|, v, au, av
    aorta_mm: float
    spine_mm: float
    ribs: list[float]  # angles [rad]
    bowel: list[tuple[float, float, float, float, float, str, float]]  # u, v, au, av, angle, content, level
    lung_z: float  # lungs reach down to this z [mm]
    gallbladder: tuple[float, float, float] | None  # u, v, radius in u units
    lesions: list[tuple[str, float, float, float, float, float]]  # organ, u, v, z, radius_mm, contrast
    texture_seed: int
    z0: float  # where slice 0 sits along the body axis [mm]


def phantom_spec(rng: np.random.Generator) -> PhantomSpec:
    """Draw one phantom patient's anatomy."""
    u = rng.uniform
    a = u(0.80, 0.90)
    b = a * u(0.66, 0.80)
    hu = {
        "skin": u(20, 40),
        "fat": u(-110, -90),
        "visceral_fat": u(-100, -80),
        "muscle": u(45, 58),
        "liver": u(55, 70),
        "spleen": u(42, 52),
        "kidney": u(28, 38),
        "vessel": u(35, 45),
        "bowel_wall": u(30, 45),
        "fluid": u(5, 20),
        "cortical": u(950, 1250),
        "cancellous": u(220, 320),
        "rib": u(650, 850),
        "csf": u(5, 15),
        "lung": u(-870, -830),
        "gallbladder": u(0, 15),
    }
    bowel = []
    for _ in range(int(rng.integers(5, 10))):
        content = rng.choice(["gas", "fluid", "level"], p=[0.35, 0.35, 0.3])
        bowel.append(
            (
                u(-0.45, 0.5),
                u(-0.55, 0.15),
                u(0.06, 0.14),
                u(0.05, 0.12),
                u(0, np.pi),
                str(content),
                u(-0.3, 0.3),
            )
        )
    lesions = []
    for _ in range(int(rng.integers(2, 5))):
        organ = "liver" if rng.random() < 0.75 else "spleen"
        contrast = -u(8, 40) if rng.random() < 0.75 else u(10, 25)
        lesions.append((organ, u(-0.6, 0.6), u(-0.6, 0.6), u(-5, 25), u(3, 10), contrast))
    return PhantomSpec(
        a=a,
        b=b,
        cx=u(-0.03, 0.03),
        cy=u(-0.02, 0.06),
        harmonics=[(k, u(0, 0.035 / (k - 1)), u(0, 2 * np.pi)) for k in (2, 3, 4)],
        skin_mm=u(1.5, 2.5),
        fat_frac=u(0.07, 0.16),
        fat_phase=u(0, 2 * np.pi),
        muscle_frac=u(0.05, 0.08),
        hu=hu,
        liver=(u(-0.45, -0.3), u(-0.15, 0.0), u(0.42, 0.52), u(0.5, 0.62), u(-0.3, 0.3)),
        spleen=(u(0.42, 0.55), u(0.05, 0.25), u(0.14, 0.2), u(0.22, 0.3), u(-0.6, -0.2)),
        kidney_z=(u(35, 70), u(45, 60)),
        kidney_uv=(u(0.3, 0.38), u(0.35, 0.45), u(0.1, 0.14), u(0.16, 0.22)),
        aorta_mm=u(9, 12),
        spine_mm=u(14, 19),
        ribs=list(np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(4, 9))))),
        bowel=bowel,
        lung_z=u(-15, 25),
        gallbladder=(u(-0.35, -0.2), u(-0.1, 0.1), u(0.06, 0.1)) if rng.random() < 0.6 else None,
        lesions=lesions,
        texture_seed=int(rng.integers(0, 2**31 - 1)),
        z0=u(0, 30),
    )


def _grf(n: int, sigma_px: float, seed: int) -> np.ndarray:
    """Smooth Gaussian random field with unit standard deviation."""
    field_ = ndimage.gaussian_filter(
        np.random.default_rng(seed).standard_normal((n, n)), sigma_px, mode="wrap"
    )
    return field_ / field_.std()


def _texture(n: int, sigma_px: float, seed: int, z_mm: float, corr_mm: float = 12.0) -> np.ndarray:
    # Rotating between two independent fields keeps the variance and makes slices 3 mm apart
    # ~90 % correlated: neighbouring slices look alike, far ones do not.
    phase = z_mm / corr_mm * np.pi / 2
    return np.cos(phase) * _grf(n, sigma_px, seed) + np.sin(phase) * _grf(n, sigma_px, seed + 1)


# Anatomical sizes below are in "body millimetres": a body semi-axis of 1 (body units) stands
# for 160 mm, an adult abdomen's half width. Anatomy scales with the body, so a phantom looks the
# same at any image size; its physical size (which sets the noise) is size x pixel size.
_BODY_HALF_WIDTH_MM = 160.0


def render_phantom(
    spec: PhantomSpec, size: int, pixel_size_mm: float = PHANTOM_PIXEL_MM, z_mm: float = 0.0
) -> np.ndarray:
    """One axial slice (float32 HU [size, size]) of the phantom at body position ``z_mm``."""
    n = size
    grid = (np.arange(n) - (n - 1) / 2.0) / (n / 2.0)
    X, Y = np.meshgrid(grid, grid)  # X right, Y down, in units of the half field of view
    U, V = (X - spec.cx) / spec.a, (Y - spec.cy) / spec.b
    theta = np.arctan2(V, U)  # 0 = image right, pi/2 = back, -pi/2 = front
    outline = 1.0 + sum(amp * np.cos(k * theta + ph) for k, amp, ph in spec.harmonics)
    rho = np.hypot(U, V) / outline
    mm = 1.0 / _BODY_HALF_WIDTH_MM  # one body millimetre in u units
    aspect = spec.a / spec.b  # a circle of radius r (u units) has v semi-axis r * aspect
    px_per_mm = spec.a * (n / 2.0) * mm  # pixels per body millimetre
    z = spec.z0 + z_mm
    hu = spec.hu

    def ell(cu, cv, au, av, ang=0.0):
        c, s = np.cos(ang), np.sin(ang)
        du, dv = U - cu, V - cv
        return ((c * du + s * dv) / au) ** 2 + ((-s * du + c * dv) / av) ** 2

    def disc(cu, cv, r):
        return ell(cu, cv, r, r * aspect) <= 1

    img = np.full((n, n), -1000.0)
    body = rho <= 1.0
    img[body] = hu["skin"]
    fat_inner = 1.0 - spec.skin_mm * mm
    inside_skin = rho <= fat_inner
    img[inside_skin] = hu["fat"]
    # Subcutaneous fat thickness varies around the body.
    fat = spec.fat_frac * (1.0 + 0.35 * np.cos(2 * theta + spec.fat_phase))
    wall_outer = fat_inner - fat
    img[rho <= wall_outer] = hu["muscle"]
    cavity = rho <= wall_outer - spec.muscle_frac
    img[cavity] = hu["visceral_fat"]

    spine_v = 0.42
    sr = spec.spine_mm * mm
    liver_scale = float(np.clip(1.0 - z / 150.0, 0.35, 1.0))

    # Bowel loops (and the stomach in the upper slices), painted first: solid organs cover them.
    loops = list(spec.bowel)
    if liver_scale > 0.75:
        loops.append((0.3, -0.35, 0.22, 0.2, 0.3, "level", 0.1))
    for bu, bv, au, av, ang, content, level in loops:
        drift = 0.002 * z
        cu, cv = bu + drift, bv - drift
        wall = (ell(cu, cv, au, av, ang) <= 1) & cavity
        lumen = (ell(cu, cv, au - 3 * mm, av - 3 * mm * aspect, ang) <= 1) & cavity
        img[wall] = hu["bowel_wall"]
        if content == "gas":
            img[lumen] = -1000.0
        elif content == "fluid":
            img[lumen] = hu["fluid"]
        else:  # air-fluid level: gas rises to the front (smaller v)
            front = V < cv + level * av
            img[lumen & front] = -1000.0
            img[lumen & ~front] = hu["fluid"]

    lu, lv, lau, lav, lang = spec.liver
    liver = (ell(lu, lv, lau * liver_scale, lav * liver_scale, lang) <= 1) & cavity
    img[liver] = hu["liver"]
    if spec.gallbladder is not None and liver_scale > 0.6:
        gu, gv, gr = spec.gallbladder
        img[(ell(gu, gv + 0.2, gr, gr * 1.3) <= 1) & liver] = hu["gallbladder"]
    su, sv, sau, sav, sang = spec.spleen
    spleen_scale = float(np.clip(1.0 - z / 120.0, 1e-3, 1.0))
    spleen = (ell(su, sv, sau * spleen_scale, sav * spleen_scale, sang) <= 1) & cavity
    img[spleen] = hu["spleen"]
    kz, kh = spec.kidney_z
    kscale = float(np.sqrt(max(0.0, 1.0 - ((z - kz) / kh) ** 2)))
    if kscale > 0.05:
        ku, kv, kau, kav = spec.kidney_uv
        for side in (-1, 1):
            kid = (ell(side * ku, kv, kau * kscale, kav * kscale, side * 0.4) <= 1) & cavity
            img[kid] = hu["kidney"]
            sinus = (ell(side * (ku - 0.3 * kau), kv, kau * kscale * 0.35, kav * kscale * 0.4) <= 1) & kid
            img[sinus] = hu["visceral_fat"] * 0.6
    psoas_r = (9.0 + 0.12 * max(z, 0.0)) * mm
    for side in (-1, 1):
        img[disc(side * (sr + psoas_r * 0.9), spine_v - 0.3 * sr * aspect, psoas_r) & cavity] = hu["muscle"]
    aorta = spec.aorta_mm * mm
    img[disc(0.04, spine_v - (sr + aorta + 2 * mm) * aspect, aorta)] = hu["vessel"]
    img[ell(-0.1, spine_v - (sr + aorta) * aspect, aorta * 1.25, aorta * 0.9 * aspect) <= 1] = hu["vessel"]

    # Lung bases: dark crescents behind the organs in the upper slices.
    lung_scale = float(np.clip((spec.lung_z - z) / 25.0, 0.0, 1.0))
    lung = np.zeros((n, n), bool)
    if lung_scale > 0:
        for side in (-1, 1):
            lung |= (ell(side * 0.55, 0.45, 0.25 * lung_scale, 0.35 * lung_scale) <= 1) & cavity
        img[lung] = hu["lung"]

    # Low-contrast lesions: spheres, so they grow and shrink over neighbouring slices.
    organs = {"liver": (liver, lu, lv, lau, lav), "spleen": (spleen, su, sv, sau, sav)}
    for organ, cu, cv, cz, r_mm, contrast in spec.lesions:
        r = np.sqrt(max(0.0, r_mm**2 - (z_mm - cz) ** 2)) * mm
        if r > 0:
            mask, ou, ov, oau, oav = organs[organ]
            img[disc(ou + cu * 0.5 * oau, ov + cv * 0.5 * oav, r) & mask] += contrast

    # Back muscles, then the vertebra: body (cortical shell, cancellous core), canal, processes.
    for side in (-1, 1):
        m = (ell(side * 0.15, spine_v + 2.6 * sr * aspect, 0.13, 0.2) <= 1) & inside_skin
        img[m] = hu["muscle"]
    shell = 2.0 * mm
    img[disc(0.0, spine_v, sr)] = hu["cortical"]
    img[disc(0.0, spine_v, sr - shell)] = hu["cancellous"]
    canal_r = 0.45 * sr
    canal_v = spine_v + (sr + canal_r * 1.1) * aspect
    img[disc(0.0, canal_v, canal_r + 3 * mm) & inside_skin] = hu["cortical"] * 0.8
    img[disc(0.0, canal_v, canal_r)] = hu["csf"]
    spinous = ell(0.0, canal_v + (canal_r + 12 * mm) * aspect, 3.5 * mm, 12 * mm * aspect) <= 1
    img[spinous & inside_skin] = hu["cortical"] * 0.8
    for side in (-1, 1):
        tp = ell(side * 1.5 * sr, canal_v - 0.2 * sr * aspect, 0.7 * sr, 0.22 * sr * aspect, side * 0.25) <= 1
        img[tp & inside_skin] = hu["cortical"] * 0.75
    for ang in spec.ribs:
        ang = (ang + np.pi) % (2 * np.pi) - np.pi
        if -0.85 * np.pi < ang < -0.15 * np.pi:
            continue  # no ribs over the front of the abdomen
        outline_r = 1.0 + sum(amp * np.cos(k * ang + ph) for k, amp, ph in spec.harmonics)
        fat_r = spec.fat_frac * (1.0 + 0.35 * np.cos(2 * ang + spec.fat_phase))
        radial = (fat_inner - fat_r - spec.muscle_frac * 0.5) * outline_r
        rib_r = 4.5 * mm
        r2 = ell(radial * np.cos(ang), radial * np.sin(ang), rib_r * 1.6, rib_r, ang + np.pi / 2)
        img[r2 <= 1] = hu["rib"]
        img[r2 <= 0.35] = hu["cancellous"]

    # Texture: organ heterogeneity, fat septa, trabecular bone; smooth along z.
    seed = spec.texture_seed
    soft = (img > -200) & (img < 200)
    fatty = (img >= -200) & (img <= -50)
    bone = img >= 200
    tex = _texture(n, 1.5 * px_per_mm, seed, z) * 7.0 + _texture(n, 6.0 * px_per_mm, seed + 2, z) * 4.0
    img[soft] += tex[soft]
    img[fatty] += (_texture(n, 1.2 * px_per_mm, seed + 4, z) * 12.0)[fatty]
    img[bone] += (_texture(n, 0.9 * px_per_mm, seed + 6, z) * 45.0)[bone]
    img[lung] += (_texture(n, 2.0 * px_per_mm, seed + 8, z) * 25.0)[lung]
    # The scanner's finite resolution: edges are slightly blurred, as in a real full-dose image.
    img = ndimage.gaussian_filter(img, 0.45 / pixel_size_mm)
    return img.astype(np.float32)


def make_phantom(
    size: int, rng: np.random.Generator, pixel_size_mm: float = PHANTOM_PIXEL_MM, z_mm: float = 0.0
) -> np.ndarray:
    """A random anatomical phantom slice in HU (float32 [size, size])."""
    return render_phantom(phantom_spec(rng), size, pixel_size_mm, z_mm)


# --------------------------------------------------------------------------- DICOM writing


def write_ct_slice(
    path: Path,
    hu: np.ndarray,
    *,
    patient: str,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    sop_uid: str,
    series_description: str,
    series_number: int,
    instance: int,
    position: Sequence[float],
    spacing: Sequence[float],
    thickness: float,
) -> None:
    """Write one CT slice as int16 (RescaleIntercept -1024, slope 1), Explicit VR Little Endian."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

    stored = np.clip(np.rint(np.asarray(hu, dtype=np.float64) + 1024.0), -32768, 32767).astype("<i2")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "CT"
    ds.Manufacturer = "ldct built-in set"
    ds.PatientName = patient
    ds.PatientID = patient
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance
    ds.SeriesDescription = series_description
    ds.KVP = 120
    ds.SliceThickness = f"{thickness:g}"
    ds.ImagePositionPatient = [f"{v:.6g}" for v in position]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = f"{position[2]:.6g}"
    ds.PixelSpacing = [f"{v:.6g}" for v in spacing]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _uid(*parts: Any) -> str:
    from pydicom.uid import generate_uid

    # Same entropy -> same UID: re-generating the set with the same seed gives identical files.
    return generate_uid(entropy_srcs=["ldct-builtin", *map(str, parts)])


def builtin_params(
    dose: float, phantoms: int, slices: int, size: int, seed: int, pixel_size_mm: float
) -> dict:
    """Everything that determines a built-in tree's content (recorded in its marker file)."""
    return {
        "version": BUILTIN_VERSION,
        "dose": float(dose),
        "phantoms": int(phantoms),
        "slices": int(slices),
        "size": int(size),
        "seed": int(seed),
        "pixel_size_mm": float(pixel_size_mm),
        "i0": I0_FULL_DOSE,
        "electronic_noise": ELECTRONIC_NOISE,
        "views": VIEWS,
        "filter": FBP_FILTER,
    }


def read_builtin_marker(out: Path | str) -> dict | None:
    """The marker of a built-in tree (its parameters and files), or None if ``out`` is not one."""
    marker = Path(out) / BUILTIN_MARKER
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "params" in data and "files" in data else None


def _tree_intact(out: Path, marker: dict) -> bool:
    for rel, size in marker["files"].items():
        try:
            if (out / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _ctsmall_slices(dose: float, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    full = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    spacing = float(ds.PixelSpacing[0])
    canvas, where = embed_in_body(full, spacing)
    rng = np.random.default_rng([seed, 0, 0, 1])
    low = simulate_low_dose(canvas, dose, rng, pixel_size_mm=spacing)[where]
    info = {
        "position": [float(v) for v in ds.ImagePositionPatient],
        "spacing": [float(v) for v in ds.PixelSpacing],
        "thickness": float(ds.SliceThickness),
    }
    return low, full, info


def write_builtin(
    out: Path | str,
    dose: float = 0.25,
    phantoms: int = 6,
    slices: int = 4,
    size: int = 256,
    seed: int = 0,
    progress: bool = True,
    pixel_size_mm: float = PHANTOM_PIXEL_MM,
) -> Path:
    """Write the built-in Mayo-layout tree ``OUT/<patient>/{full,quarter}_3mm/<n>.IMA``.

    Phantoms PH01..PHnn (``slices`` neighbouring 3 mm slices each) and CTSMALL (the real slice,
    its quarter dose simulated). Deterministic for a seed: same pixels, same UIDs. ``out`` must be
    missing, empty or a previous built-in tree; an intact tree with the same parameters is left
    untouched. The tree is written next to ``out`` and renamed into place, so a reader never sees
    a half-written tree and two processes racing to write it are safe.
    """
    from tqdm import tqdm

    out = Path(out)
    if not 0 < dose <= 1:
        raise ValueError(f"dose must be in (0, 1], got {dose}")
    if phantoms < 1 or slices < 1 or size < 32:
        raise ValueError(f"need phantoms >= 1, slices >= 1, size >= 32; got {phantoms}, {slices}, {size}")
    params = builtin_params(dose, phantoms, slices, size, seed, pixel_size_mm)
    previous = read_builtin_marker(out) if out.is_dir() else None
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} is a file; give a directory for the built-in DICOM tree")
        if previous is None and any(out.iterdir()):
            raise FileExistsError(
                f"{out} is not empty and is not a built-in tree (no {BUILTIN_MARKER}); refusing to write "
                f"into it. Choose a new or empty directory."
            )
        if previous is not None and previous["params"] == params and _tree_intact(out, previous):
            return out

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the tree is ordinary data
    try:
        files = _write_tree(tmp, params, progress, tqdm)
        (tmp / BUILTIN_MARKER).write_text(
            json.dumps({"params": params, "files": files}, indent=1, sort_keys=True)
        )
        _swap_into_place(tmp, out, params)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_tree(tmp: Path, params: dict, progress: bool, tqdm) -> dict[str, int]:
    dose, seed, size, px = params["dose"], params["seed"], params["size"], params["pixel_size_mm"]
    jobs = [(f"PH{k:02d}", k) for k in range(1, params["phantoms"] + 1)]
    total = params["phantoms"] * params["slices"] + 1
    files: dict[str, int] = {}
    bar = tqdm(total=total, desc="built-in set", unit="slice", disable=not progress)
    low_desc = f"Quarter Dose Images (simulated, dose {dose:g})"

    def write_pair(patient, index, low, full, position, spacing, thickness):
        study = _uid(seed, patient, "study")
        frame = _uid(seed, patient, "frame")
        for kind, img, number, desc in (("full", full, 1, "Full Dose Images"), ("quarter", low, 2, low_desc)):
            series_dir = tmp / patient / f"{kind}_3mm"
            series_dir.mkdir(parents=True, exist_ok=True)
            path = series_dir / f"{index}.IMA"
            write_ct_slice(
                path,
                img,
                patient=patient,
                study_uid=study,
                series_uid=_uid(seed, dose, patient, kind),
                frame_uid=frame,
                sop_uid=_uid(seed, dose, size, px, patient, kind, index),
                series_description=desc,
                series_number=number,
                instance=index,
                position=position,
                spacing=spacing,
                thickness=thickness,
            )
            files[str(path.relative_to(tmp))] = path.stat().st_size

    for patient, k in jobs:
        spec = phantom_spec(np.random.default_rng([seed, k]))
        corner = -(size / 2.0) * px + px / 2.0
        for i in range(params["slices"]):
            z = SLICE_THICKNESS_MM * i
            clean = render_phantom(spec, size, px, z)
            # The phantom plays the role of the true anatomy; its "full-dose" image carries
            # full-dose noise like a real one, and the quarter dose is simulated from that image
            # exactly as it is for real data.
            full = simulate_low_dose(clean, 1.0, np.random.default_rng([seed, k, i, 0]), pixel_size_mm=px)
            low = simulate_low_dose(full, dose, np.random.default_rng([seed, k, i, 1]), pixel_size_mm=px)
            write_pair(patient, i + 1, low, full, [corner, corner, z], [px, px], SLICE_THICKNESS_MM)
            bar.update()
    low, full, info = _ctsmall_slices(dose, seed)
    write_pair(CTSMALL, 1, low, full, info["position"], info["spacing"], info["thickness"])
    bar.update()
    bar.close()
    return files


def _swap_into_place(tmp: Path, out: Path, params: dict) -> None:
    try:
        os.rename(tmp, out)  # succeeds if out is missing or an empty directory
        return
    except OSError:
        pass
    current = read_builtin_marker(out)
    if current is not None and current["params"] == params and _tree_intact(out, current):
        return  # another process finished the same tree first
    if current is None and any(out.iterdir()):
        raise FileExistsError(f"{out} was filled by someone else while the built-in set was written")
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, trash / "tree")
    os.rename(tmp, out)
    shutil.rmtree(trash, ignore_errors=True)
