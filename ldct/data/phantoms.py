"""Synthetic anatomical phantoms: random but fixed abdomens, rendered at any z and image size.

They play the role of the noise-free true anatomy in the built-in set (:mod:`ldct.data.builtin`):
their full-dose image is simulated from them, their quarter dose from that full-dose image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

PHANTOM_PIXEL_MM = 0.7


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


# One body millimetre in body units (u).
_MM = 1.0 / _BODY_HALF_WIDTH_MM
# Where the vertebral body's centre sits (v, body units): towards the back.
_SPINE_V = 0.42


@dataclass
class _Canvas:
    """One slice being painted: its pixels' body coordinates (u right, v down) and the image."""

    U: np.ndarray
    V: np.ndarray
    aspect: float  # a circle of radius r (u units) has v semi-axis r * aspect
    img: np.ndarray

    def ell(self, cu: float, cv: float, au: float, av: float, ang: float = 0.0) -> np.ndarray:
        """<= 1 inside the ellipse at (cu, cv) with semi-axes (au, av), turned by ``ang``."""
        c, s = np.cos(ang), np.sin(ang)
        du, dv = self.U - cu, self.V - cv
        return ((c * du + s * dv) / au) ** 2 + ((-s * du + c * dv) / av) ** 2

    def disc(self, cu: float, cv: float, r: float) -> np.ndarray:
        """A circle of radius ``r`` (u units) on the body's scale."""
        return self.ell(cu, cv, r, r * self.aspect) <= 1


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
    px_per_mm = spec.a * (n / 2.0) * _MM  # pixels per body millimetre
    z = spec.z0 + z_mm
    canvas = _Canvas(U, V, spec.a / spec.b, np.full((n, n), -1000.0))

    inside_skin, cavity, fat_inner = _body_wall(canvas, spec, rho, theta)
    liver_scale = float(np.clip(1.0 - z / 150.0, 0.35, 1.0))
    _bowel(canvas, spec, z, liver_scale, cavity)
    organs = _solid_organs(canvas, spec, z, liver_scale, cavity)
    _retroperitoneum(canvas, spec, z, cavity)
    lung = _lung_bases(canvas, spec, z, cavity)
    _lesions(canvas, spec, z_mm, organs)
    _spine(canvas, spec, inside_skin)
    _ribs(canvas, spec, fat_inner)
    _texture_in(canvas.img, spec.texture_seed, z, px_per_mm, lung)
    # The scanner's finite resolution: edges are slightly blurred, as in a real full-dose image.
    img = ndimage.gaussian_filter(canvas.img, 0.45 / pixel_size_mm)
    return img.astype(np.float32)


def _body_wall(
    canvas: _Canvas, spec: PhantomSpec, rho: np.ndarray, theta: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Skin, subcutaneous fat, muscle wall and the abdominal cavity's visceral fat; returns
    (inside the skin, the cavity, the fat's inner edge in outline units)."""
    img, hu = canvas.img, spec.hu
    body = rho <= 1.0
    img[body] = hu["skin"]
    fat_inner = 1.0 - spec.skin_mm * _MM
    inside_skin = rho <= fat_inner
    img[inside_skin] = hu["fat"]
    # Subcutaneous fat thickness varies around the body.
    fat = spec.fat_frac * (1.0 + 0.35 * np.cos(2 * theta + spec.fat_phase))
    wall_outer = fat_inner - fat
    img[rho <= wall_outer] = hu["muscle"]
    cavity = rho <= wall_outer - spec.muscle_frac
    img[cavity] = hu["visceral_fat"]
    return inside_skin, cavity, fat_inner


def _bowel(canvas: _Canvas, spec: PhantomSpec, z: float, liver_scale: float, cavity: np.ndarray) -> None:
    # Bowel loops (and the stomach in the upper slices), painted first: solid organs cover them.
    img, hu, ell = canvas.img, spec.hu, canvas.ell
    loops = list(spec.bowel)
    if liver_scale > 0.75:
        loops.append((0.3, -0.35, 0.22, 0.2, 0.3, "level", 0.1))
    for bu, bv, au, av, ang, content, level in loops:
        drift = 0.002 * z
        cu, cv = bu + drift, bv - drift
        wall = (ell(cu, cv, au, av, ang) <= 1) & cavity
        lumen = (ell(cu, cv, au - 3 * _MM, av - 3 * _MM * canvas.aspect, ang) <= 1) & cavity
        img[wall] = hu["bowel_wall"]
        if content == "gas":
            img[lumen] = -1000.0
        elif content == "fluid":
            img[lumen] = hu["fluid"]
        else:  # air-fluid level: gas rises to the front (smaller v)
            front = canvas.V < cv + level * av
            img[lumen & front] = -1000.0
            img[lumen & ~front] = hu["fluid"]


def _solid_organs(
    canvas: _Canvas, spec: PhantomSpec, z: float, liver_scale: float, cavity: np.ndarray
) -> dict[str, tuple[np.ndarray, float, float, float, float]]:
    """Liver (with the gallbladder) and spleen; returns organ -> (mask, u, v, au, av) for lesions."""
    img, hu, ell = canvas.img, spec.hu, canvas.ell
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
    return {"liver": (liver, lu, lv, lau, lav), "spleen": (spleen, su, sv, sau, sav)}


def _retroperitoneum(canvas: _Canvas, spec: PhantomSpec, z: float, cavity: np.ndarray) -> None:
    """Kidneys (with their sinus fat), psoas muscles, aorta and vena cava."""
    img, hu, ell, disc, aspect = canvas.img, spec.hu, canvas.ell, canvas.disc, canvas.aspect
    sr = spec.spine_mm * _MM
    kz, kh = spec.kidney_z
    kscale = float(np.sqrt(max(0.0, 1.0 - ((z - kz) / kh) ** 2)))
    if kscale > 0.05:
        ku, kv, kau, kav = spec.kidney_uv
        for side in (-1, 1):
            kid = (ell(side * ku, kv, kau * kscale, kav * kscale, side * 0.4) <= 1) & cavity
            img[kid] = hu["kidney"]
            sinus = (ell(side * (ku - 0.3 * kau), kv, kau * kscale * 0.35, kav * kscale * 0.4) <= 1) & kid
            img[sinus] = hu["visceral_fat"] * 0.6
    psoas_r = (9.0 + 0.12 * max(z, 0.0)) * _MM
    for side in (-1, 1):
        img[disc(side * (sr + psoas_r * 0.9), _SPINE_V - 0.3 * sr * aspect, psoas_r) & cavity] = hu["muscle"]
    aorta = spec.aorta_mm * _MM
    img[disc(0.04, _SPINE_V - (sr + aorta + 2 * _MM) * aspect, aorta)] = hu["vessel"]
    img[ell(-0.1, _SPINE_V - (sr + aorta) * aspect, aorta * 1.25, aorta * 0.9 * aspect) <= 1] = hu["vessel"]


def _lung_bases(canvas: _Canvas, spec: PhantomSpec, z: float, cavity: np.ndarray) -> np.ndarray:
    """Lung bases: dark crescents behind the organs in the upper slices; returns their mask."""
    n = canvas.img.shape[0]
    lung_scale = float(np.clip((spec.lung_z - z) / 25.0, 0.0, 1.0))
    lung = np.zeros((n, n), bool)
    if lung_scale > 0:
        for side in (-1, 1):
            lung |= (canvas.ell(side * 0.55, 0.45, 0.25 * lung_scale, 0.35 * lung_scale) <= 1) & cavity
        canvas.img[lung] = spec.hu["lung"]
    return lung


def _lesions(
    canvas: _Canvas,
    spec: PhantomSpec,
    z_mm: float,
    organs: dict[str, tuple[np.ndarray, float, float, float, float]],
) -> None:
    # Low-contrast lesions: spheres, so they grow and shrink over neighbouring slices.
    for organ, cu, cv, cz, r_mm, contrast in spec.lesions:
        r = np.sqrt(max(0.0, r_mm**2 - (z_mm - cz) ** 2)) * _MM
        if r > 0:
            mask, ou, ov, oau, oav = organs[organ]
            canvas.img[canvas.disc(ou + cu * 0.5 * oau, ov + cv * 0.5 * oav, r) & mask] += contrast


def _spine(canvas: _Canvas, spec: PhantomSpec, inside_skin: np.ndarray) -> None:
    """Back muscles, then the vertebra: body (cortical shell, cancellous core), canal, processes."""
    img, hu, ell, disc, aspect = canvas.img, spec.hu, canvas.ell, canvas.disc, canvas.aspect
    sr = spec.spine_mm * _MM
    for side in (-1, 1):
        m = (ell(side * 0.15, _SPINE_V + 2.6 * sr * aspect, 0.13, 0.2) <= 1) & inside_skin
        img[m] = hu["muscle"]
    shell = 2.0 * _MM
    img[disc(0.0, _SPINE_V, sr)] = hu["cortical"]
    img[disc(0.0, _SPINE_V, sr - shell)] = hu["cancellous"]
    canal_r = 0.45 * sr
    canal_v = _SPINE_V + (sr + canal_r * 1.1) * aspect
    img[disc(0.0, canal_v, canal_r + 3 * _MM) & inside_skin] = hu["cortical"] * 0.8
    img[disc(0.0, canal_v, canal_r)] = hu["csf"]
    spinous = ell(0.0, canal_v + (canal_r + 12 * _MM) * aspect, 3.5 * _MM, 12 * _MM * aspect) <= 1
    img[spinous & inside_skin] = hu["cortical"] * 0.8
    for side in (-1, 1):
        tp = ell(side * 1.5 * sr, canal_v - 0.2 * sr * aspect, 0.7 * sr, 0.22 * sr * aspect, side * 0.25) <= 1
        img[tp & inside_skin] = hu["cortical"] * 0.75


def _ribs(canvas: _Canvas, spec: PhantomSpec, fat_inner: float) -> None:
    """Ribs in the muscle wall, round the back and sides only."""
    for ang in spec.ribs:
        ang = (ang + np.pi) % (2 * np.pi) - np.pi
        if -0.85 * np.pi < ang < -0.15 * np.pi:
            continue  # no ribs over the front of the abdomen
        outline_r = 1.0 + sum(amp * np.cos(k * ang + ph) for k, amp, ph in spec.harmonics)
        fat_r = spec.fat_frac * (1.0 + 0.35 * np.cos(2 * ang + spec.fat_phase))
        radial = (fat_inner - fat_r - spec.muscle_frac * 0.5) * outline_r
        rib_r = 4.5 * _MM
        r2 = canvas.ell(radial * np.cos(ang), radial * np.sin(ang), rib_r * 1.6, rib_r, ang + np.pi / 2)
        canvas.img[r2 <= 1] = spec.hu["rib"]
        canvas.img[r2 <= 0.35] = spec.hu["cancellous"]


def _texture_in(img: np.ndarray, seed: int, z: float, px_per_mm: float, lung: np.ndarray) -> None:
    # Texture: organ heterogeneity, fat septa, trabecular bone; smooth along z.
    n = img.shape[0]
    soft = (img > -200) & (img < 200)
    fatty = (img >= -200) & (img <= -50)
    bone = img >= 200
    tex = _texture(n, 1.5 * px_per_mm, seed, z) * 7.0 + _texture(n, 6.0 * px_per_mm, seed + 2, z) * 4.0
    img[soft] += tex[soft]
    img[fatty] += (_texture(n, 1.2 * px_per_mm, seed + 4, z) * 12.0)[fatty]
    img[bone] += (_texture(n, 0.9 * px_per_mm, seed + 6, z) * 45.0)[bone]
    img[lung] += (_texture(n, 2.0 * px_per_mm, seed + 8, z) * 25.0)[lung]


def make_phantom(
    size: int, rng: np.random.Generator, pixel_size_mm: float = PHANTOM_PIXEL_MM, z_mm: float = 0.0
) -> np.ndarray:
    """A random anatomical phantom slice in HU (float32 [size, size])."""
    return render_phantom(phantom_spec(rng), size, pixel_size_mm, z_mm)
