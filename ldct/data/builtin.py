"""The built-in DICOM set: synthetic phantoms plus the real CT slices bundled with pydicom and
pydicom-data, with simulated quarter dose, written as a Mayo-layout tree.

``OUT/<patient>/{full,quarter}_3mm/<n>.IMA``: phantoms ``PH01..`` (neighbouring 3 mm slices; the
rendered phantom is the true anatomy, its full dose simulated directly at dose 1, its quarter dose
inserted into that full-dose image) and the real patients (their file is the full dose, HU
exactly; the quarter dose is inserted into it with the same dose-corrected model), so the
built-in path runs exactly the code real data takes (docs/DESIGN.md §3).

Real patients (all five train by default; each is one leave-one-slice-out test fold of
``ldct repeat --protocol loso``; validation PH01 and test PH02 are phantoms, docs/DESIGN.md §3):
- ``CTSMALL``: pydicom's ``CT_small.dcm`` (128x128, an 85 mm crop).
- ``ABDOMEN``: pydicom-data's ``explicit_VR-UN.dcm``, a PANCREAS abdomen slice, 512x512, 0.86 mm,
  JPEG 2000 lossless.
- ``HEAD693``: pydicom-data's ``693_UNCR.dcm``, a CQ500 head slice, 512x512, 0.48 mm,
  uncompressed (its JPEG 2000 twins decode to the same HU).
- ``SPINE``: pydicom-data's ``bad_sequence.dcm``, a lumbar/back slice (vertebra, muscle, fat),
  512x512, 0.29 mm, JPEG lossless.
- ``HEADJ2K``: pydicom-data's ``J2K_pixelrep_mismatch.dcm``, a skull-base head slice, 512x512,
  0.43 mm, JPEG 2000.

The real slices are the only real texture the network learns from (the phantoms are piecewise
smooth): with two of them in training the quick profile's best validation PSNR (then on HEAD693)
rose from 30.2 to 33.5 dB (one `ldct train --profile quick` run each, same seed).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ldct.data.dicom import read_hu
from ldct.data.discovery import BUILTIN_MARKER, BUILTIN_TEST_PATIENTS, BUILTIN_VAL_PATIENTS
from ldct.data.noise import ESTIMATOR
from ldct.data.phantoms import PHANTOM_PIXEL_MM, phantom_spec, render_phantom
from ldct.data.simulate import (
    ELECTRONIC_NOISE,
    FBP_FILTER,
    I0_FULL_DOSE,
    INSERTION_METHOD,
    REFERENCE_VIEWS,
    insert_calibrated,
    simulate_low_dose,
)
from ldct.data.writer import ct_slice, hu_to_stored, save

SLICE_THICKNESS_MM = 3.0
# Bump for a change the code digest below cannot see (it covers the simulating modules' source).
BUILTIN_VERSION = 3
CTSMALL = "CTSMALL"
# patient -> (file name, where it is, embed in a body outline?). CT_small is a crop of a larger
# body: its X-rays crossed the whole body, so it is embedded for the simulation (embed_in_body).
REAL_PATIENTS: dict[str, tuple[str, bool]] = {
    CTSMALL: ("CT_small.dcm", True),
    "HEAD693": ("693_UNCR.dcm", False),
    "ABDOMEN": ("explicit_VR-UN.dcm", False),
    "SPINE": ("bad_sequence.dcm", False),
    "HEADJ2K": ("J2K_pixelrep_mismatch.dcm", False),
}
# BodyPartExamined written into each real patient's slices (the metrics' display window follows it,
# ldct.metrics.window_for): the source files' own values, and HEAD for HEAD693 (a CQ500 head CT
# whose file carries none). Phantoms and CTSMALL carry none: soft tissue, the default.
BODY_PARTS = {"HEAD693": "HEAD", "ABDOMEN": "PANCREAS", "SPINE": "NECK", "HEADJ2K": "HEAD"}
# The real slices are the leave-one-slice-out test folds (`ldct repeat --protocol loso`): no
# choice may be made on their metrics, so the default validation and test patients are phantoms.
REAL_PATIENT_IDS: tuple[str, ...] = tuple(sorted(REAL_PATIENTS))
assert not (set(BUILTIN_TEST_PATIENTS) | set(BUILTIN_VAL_PATIENTS)) & set(REAL_PATIENTS)
_CODE_MODULES = ("simulate.py", "noise.py", "phantoms.py", "builtin.py", "writer.py")


def real_source(patient: str) -> Path:
    """The bundled file of a real built-in patient (pydicom / pydicom-data)."""
    from pydicom.data import get_testdata_file

    name = REAL_PATIENTS[patient][0]
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(
            f"{name} (built-in patient {patient}) is not installed; `pip install pydicom-data`"
        )
    return Path(path)


def code_version() -> str:
    """Digest of the code and the real source files that make the built-in set: a changed
    simulation, phantom or writer never reuses a tree or cache made by another."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _CODE_MODULES:
        h.update(name.encode() + b"\0" + (here / name).read_bytes())
    for patient in sorted(REAL_PATIENTS):
        h.update(patient.encode() + b"\0" + real_source(patient).read_bytes())
    return h.hexdigest()[:16]


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
        "code": code_version(),
        "dose": float(dose),
        "phantoms": int(phantoms),
        "slices": int(slices),
        "size": int(size),
        "seed": int(seed),
        "pixel_size_mm": float(pixel_size_mm),
        "i0": I0_FULL_DOSE,
        "electronic_noise": ELECTRONIC_NOISE,
        "reference_views": REFERENCE_VIEWS,
        "views": "ceil(pi*N/2)",
        "filter": FBP_FILTER,
        "real": sorted(REAL_PATIENTS),
        "method": INSERTION_METHOD,
        "calibration": "real slices: i0 calibrated to the native noise; phantoms: i0",
        "estimator": ESTIMATOR,
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


def calibrated_real_slice(
    patient: str, full: np.ndarray, pixel_size_mm: float, dose: float, seed: int, index: int
) -> tuple[np.ndarray, dict]:
    """The quarter dose of a real built-in slice, its flux calibrated to its native noise
    (:func:`ldct.data.simulate.insert_calibrated`), and the calibration record."""
    return insert_calibrated(
        full,
        pixel_size_mm,
        dose,
        np.random.default_rng([seed, 0, index, 1]),
        seed=seed,
        embed=REAL_PATIENTS[patient][1],
        what=f"built-in patient {patient} ({REAL_PATIENTS[patient][0]})",
        # CT_small's own noise is that of ~0.08 of the reference dose (docs/DESIGN.md §3): kept,
        # its pair is dose d relative to its own noise, and its source_dose is recorded.
        check_source=False,
    )


@functools.lru_cache(maxsize=8)
def _real_slices(patient: str, dose: float, seed: int, index: int) -> tuple[np.ndarray, np.ndarray, dict]:
    # Cached per process: the 512x512 slices cost seconds each and are the same for every
    # phantom count/size (a test session writes several built-in trees).
    import warnings

    import pydicom

    path = real_source(patient)
    with warnings.catch_warnings():
        # SPINE's file has a non-conformant UID (a hash); the built-in tree writes its own UIDs.
        warnings.filterwarnings("ignore", message="Invalid value for VR UI", category=UserWarning)
        full, meta = read_hu(path)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    spacing = float(np.mean(meta["spacing"]))
    if dose < 1:
        low, calibration = calibrated_real_slice(patient, full, spacing, dose, seed, index)
    else:
        low, calibration = full.copy(), {}
    info = {
        "position": [float(v) for v in ds.ImagePositionPatient],
        "orientation": [float(v) for v in ds.ImageOrientationPatient],
        "spacing": [float(v) for v in meta["spacing"]],
        "thickness": float(meta["thickness"] or SLICE_THICKNESS_MM),
        "calibration": calibration,
    }
    low.flags.writeable = False
    full.flags.writeable = False
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

    Phantoms PH01..PHnn (``slices`` neighbouring 3 mm slices each) and the real patients of
    :data:`REAL_PATIENTS` (CTSMALL, HEAD693, ABDOMEN, SPINE, HEADJ2K), their quarter dose simulated.
    Deterministic for a seed: same pixels, same UIDs. ``out`` must be
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
        files, calibration = _write_tree(tmp, params, progress, tqdm)
        (tmp / BUILTIN_MARKER).write_text(
            json.dumps(
                {"params": params, "files": files, "calibration": calibration}, indent=1, sort_keys=True
            )
        )
        _swap_into_place(tmp, out, params)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_tree(tmp: Path, params: dict, progress: bool, tqdm) -> tuple[dict[str, int], dict[str, dict]]:
    dose, seed, size, px = params["dose"], params["seed"], params["size"], params["pixel_size_mm"]
    jobs = [(f"PH{k:02d}", k) for k in range(1, params["phantoms"] + 1)]
    total = params["phantoms"] * params["slices"] + len(REAL_PATIENTS)
    files: dict[str, int] = {}
    bar = tqdm(total=total, desc="built-in set", unit="slice", disable=not progress)
    low_desc = f"Quarter Dose Images (simulated, dose {dose:g})"

    calibration: dict[str, dict] = {}

    def write_pair(
        patient, index, low, full, position, spacing, thickness, orientation=(1, 0, 0, 0, 1, 0), cal=None
    ):
        study = _uid(seed, patient, "study")
        frame = _uid(seed, patient, "frame")
        for kind, img, number, desc in (("full", full, 1, "Full Dose Images"), ("quarter", low, 2, low_desc)):
            series_dir = tmp / patient / f"{kind}_3mm"
            path = series_dir / f"{index}.IMA"
            ds = ct_slice(
                hu_to_stored(img, 1.0, -1024.0, signed=True),
                slope=1.0,
                intercept=-1024.0,
                sop_uid=_uid(seed, dose, size, px, patient, kind, index),
                series_uid=_uid(seed, dose, patient, kind),
                study_uid=study,
                frame_uid=frame,
                series_description=desc,
                series_number=number,
                instance=index,
                spacing=spacing,
                position=position,
                orientation=orientation,
                thickness=thickness,
                patient=patient,
            )
            ds.Manufacturer = "ldct built-in set"
            if patient in BODY_PARTS:
                ds.BodyPartExamined = BODY_PARTS[patient]
            if kind == "quarter":
                flux = (
                    f"effective dose {cal['effective_dose']:.3f} measured, I0 {cal['i0']:g} calibrated to the "
                    f"native noise {cal['native_sigma_hu']:.2f} HU"
                    if cal
                    else f"I0 {I0_FULL_DOSE:g} (noise-free phantom)"
                )
                ds.DerivationDescription = (
                    f"ldct built-in set: dose {dose:g}, {flux}, electronic noise {ELECTRONIC_NOISE:g}, seed "
                    f"{seed}; {INSERTION_METHOD}"
                )[:1024]
                if cal:
                    ds.ImageComments = "ldct calibration " + json.dumps(cal, sort_keys=True)
            save(ds, path)
            files[str(path.relative_to(tmp))] = path.stat().st_size

    for patient, k in jobs:
        spec = phantom_spec(np.random.default_rng([seed, k]))
        corner = -(size / 2.0) * px + px / 2.0
        for i in range(params["slices"]):
            z = SLICE_THICKNESS_MM * i
            clean = render_phantom(spec, size, px, z)
            # The phantom is the true anatomy: its full dose is simulated from it directly, and the
            # quarter dose is inserted into that full-dose image exactly as for real data.
            full = simulate_low_dose(
                clean, 1.0, np.random.default_rng([seed, k, i, 0]), pixel_size_mm=px, noise_free=True
            )
            low = simulate_low_dose(full, dose, np.random.default_rng([seed, k, i, 1]), pixel_size_mm=px)
            write_pair(patient, i + 1, low, full, [corner, corner, z], [px, px], SLICE_THICKNESS_MM)
            bar.update()
    for index, patient in enumerate(sorted(REAL_PATIENTS)):
        low, full, info = _real_slices(patient, dose, seed, index)
        cal = info["calibration"]
        write_pair(
            patient,
            1,
            low,
            full,
            info["position"],
            info["spacing"],
            info["thickness"],
            info["orientation"],
            cal,
        )
        if cal:
            calibration[patient] = dict(cal)
        bar.update()
    bar.close()
    return files, calibration


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
