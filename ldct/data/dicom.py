"""Reading CT DICOM: headers, frames, HU conversion and geometry.

Every problem raises :class:`DicomError` naming the file and what to do. Finding and pairing the
files of a tree is :mod:`ldct.data.discovery`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from ldct.errors import LdctError

_SKIP_HINT = "or pass --skip-bad (skip_bad=True) to leave it out"

# Which package decodes which compressed transfer syntax (pydicom 3 plugins).
_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": "pip install pylibjpeg pylibjpeg-libjpeg (or pillow)",
    "1.2.840.10008.1.2.4.51": "pip install pylibjpeg pylibjpeg-libjpeg (or pillow)",
    "1.2.840.10008.1.2.4.57": "pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.70": "pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.80": "pip install pyjpegls (or pylibjpeg pylibjpeg-libjpeg, or python-gdcm)",
    "1.2.840.10008.1.2.4.81": "pip install pyjpegls (or pylibjpeg pylibjpeg-libjpeg, or python-gdcm)",
    "1.2.840.10008.1.2.4.90": "pip install pylibjpeg pylibjpeg-openjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.91": "pip install pylibjpeg pylibjpeg-openjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.201": "pip install pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pip install pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pip install pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pip install pylibjpeg pylibjpeg-rle",
}


class DicomError(LdctError, ValueError):
    """A DICOM file or tree that cannot be used; the message names the file and what to do."""


# --------------------------------------------------------------------------- one reading path
#
# Every module that reads CT pixels (discovery, cache, simulate, denoise) goes through
# frame_geometry() + read_frames(): one strictness (no silent slope 1 / intercept 0), one place
# that knows where an Enhanced CT keeps its rescale and geometry (functional groups), one decoder
# error message.

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


class LocalizerImage(DicomError):
    """A scout/localizer image (ImageType LOCALIZER): not part of an axial series, skipped with a note."""


@dataclass(frozen=True)
class FrameGeometry:
    """What one image frame needs besides its pixels: HU conversion and where it lies."""

    frame: int | None  # index in a multi-frame file; None for a single-frame image
    slope: float
    intercept: float
    spacing: tuple[float, float]  # PixelSpacing (row, column) in mm
    thickness: float | None
    position: tuple[float, float, float] | None  # ImagePositionPatient
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6 direction cosines)
    shape: tuple[int, int]  # rows, columns

    @property
    def along_normal(self) -> float | None:
        """Position on the slice normal (row x column cosines), in mm: the key that orders a
        series, tilted or not. Without orientation: the z coordinate."""
        return slice_position(self.position, self.orientation)


def slice_position(position: Sequence[float] | None, orientation: Sequence[float] | None) -> float | None:
    """``position · (row × column)``: where a slice sits along its own normal (ImagePositionPatient
    projected on the normal of ImageOrientationPatient); ``position[2]`` without an orientation."""
    if position is None:
        return None
    if orientation is None or len(orientation) != 6:
        return float(position[2])
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    return float(np.dot(np.asarray(position, float), normal))


def _item(ds: pydicom.Dataset, group: str) -> pydicom.Dataset | None:
    seq = ds.get(group)
    return seq[0] if seq else None


def _fg_value(shared: pydicom.Dataset | None, frame: pydicom.Dataset | None, group: str, keyword: str):
    # A per-frame functional group overrides the shared one (PS3.3 C.7.6.16).
    for fg in (frame, shared):
        item = _item(fg, group) if fg is not None else None
        if item is not None and item.get(keyword) is not None:
            return item.get(keyword)
    return None


def _floats(value, n: int | None = None) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = tuple(
        float(v) for v in (value if isinstance(value, Sequence) and not isinstance(value, str) else [value])
    )
    return values if n is None or len(values) == n else None


def is_localizer(ds: pydicom.Dataset) -> bool:
    image_type = ds.get("ImageType") or []
    image_type = [image_type] if isinstance(image_type, str) else list(image_type)
    return any(str(v).strip().upper() == "LOCALIZER" for v in image_type)


def frame_geometry(ds: pydicom.Dataset, path: Path | str) -> list[FrameGeometry]:
    """Rescale and geometry of every frame of a CT dataset (header only; one entry for a
    single-frame image). Raises DicomError naming ``path`` for a non-CT image, a missing rescale
    (never assumed to be slope 1 / intercept 0), missing rows/columns or PixelSpacing, and
    :class:`LocalizerImage` for a scout."""
    path = Path(path)
    modality = str(ds.get("Modality", "")).strip()
    if modality != "CT":
        raise DicomError(
            f"{path}: Modality is {modality or 'missing'!r}, not 'CT'; only CT images can be used "
            f"(move this file out of the tree, {_SKIP_HINT})"
        )
    if is_localizer(ds):
        raise LocalizerImage(
            f"{path}: localizer/scout image (ImageType LOCALIZER), not an axial slice; skipped"
        )
    for tag in ("Rows", "Columns"):
        if ds.get(tag) is None:
            raise DicomError(f"{path}: missing {tag}; cannot use this image ({_SKIP_HINT})")
    shape = (int(ds.Rows), int(ds.Columns))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    multi = "PerFrameFunctionalGroupsSequence" in ds or frames > 1
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if multi and per_frame and len(per_frame) != frames:
        raise DicomError(
            f"{path}: {frames} frames but {len(per_frame)} per-frame functional groups; the file is "
            f"inconsistent ({_SKIP_HINT})"
        )
    out = []
    try:
        for f in range(frames):
            fg = per_frame[f] if per_frame else None

            def get(group: str, keyword: str, fg=fg):
                value = _fg_value(shared, fg, group, keyword) if multi else None
                return ds.get(keyword) if value is None else value

            slope = get("PixelValueTransformationSequence", "RescaleSlope")
            intercept = get("PixelValueTransformationSequence", "RescaleIntercept")
            missing = [
                n for n, v in (("RescaleSlope", slope), ("RescaleIntercept", intercept)) if v in (None, "")
            ]
            if missing:
                where = " (top level or Pixel Value Transformation functional group)" if multi else ""
                raise DicomError(
                    f"{path}: missing {' and '.join(missing)}{where}, so the pixel values cannot be "
                    f"converted to HU (add the tags, e.g. slope 1 and the scanner's intercept, {_SKIP_HINT})"
                )
            spacing = _floats(get("PixelMeasuresSequence", "PixelSpacing"), 2)
            if spacing is None:
                raise DicomError(f"{path}: missing PixelSpacing; cannot use this image ({_SKIP_HINT})")
            thickness = get("PixelMeasuresSequence", "SliceThickness")
            out.append(
                FrameGeometry(
                    frame=f if multi else None,
                    slope=float(slope),
                    intercept=float(intercept),
                    spacing=(spacing[0], spacing[1]),
                    thickness=float(thickness) if thickness not in (None, "") else None,
                    position=_floats(get("PlanePositionSequence", "ImagePositionPatient"), 3),
                    orientation=_floats(get("PlaneOrientationSequence", "ImageOrientationPatient"), 6),
                    shape=shape,
                )
            )
    except (ValueError, TypeError, IndexError) as exc:
        raise DicomError(f"{path}: malformed rescale or geometry tags ({exc}); {_SKIP_HINT}") from exc
    return out


def to_hu(stored: np.ndarray, geometry: FrameGeometry) -> np.ndarray:
    """Stored pixel values -> HU (float32): ``stored * RescaleSlope + RescaleIntercept``."""
    return stored.astype(np.float32) * np.float32(geometry.slope) + np.float32(geometry.intercept)


def _dcmread(path: Path, header_only: bool) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only)
    except InvalidDicomError as exc:
        raise DicomError(f"{path}: not a DICOM file ({exc}); remove or replace it, {_SKIP_HINT}") from exc
    except Exception as exc:  # pydicom raises many types on truncated/corrupt files
        raise DicomError(
            f"{path}: unreadable or corrupt DICOM file ({type(exc).__name__}: {exc}); "
            f"re-copy it from the source, {_SKIP_HINT}"
        ) from exc


# --------------------------------------------------------------------------- pixels


def _decode_error(path: Path, ds: pydicom.Dataset, exc: Exception) -> DicomError:
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    name = f"{ts.name} ({ts})" if ts is not None else "unknown transfer syntax"
    detail = " ".join(str(exc).split())
    if ts is not None and ts.is_compressed:
        hint = _DECODER_HINTS.get(
            str(ts),
            "no pydicom plugin is known for it: convert the file to an "
            "uncompressed transfer syntax (e.g. `dcmdjpeg`/`gdcmconv --raw`)",
        )
        if (
            "missing dependencies" in detail
            or "No pixel data decoders" in detail
            or "is not supported" in detail
        ):
            what = f"no decoder for {name} is installed; {hint}"
        else:
            what = f"the installed decoders failed on {name} (corrupt data?); another decoder may read it: {hint}"
        return DicomError(f"{path}: cannot decode compressed pixel data: {what} [pydicom: {detail}]")
    return DicomError(f"{path}: cannot read pixel data in {name} ({detail}); re-copy the file, {_SKIP_HINT}")


def read_frames(
    path: Path | str, frames: Sequence[int] | None = None
) -> tuple[pydicom.Dataset, list[tuple[np.ndarray, np.ndarray, FrameGeometry]]]:
    """Decode a CT file frame by frame: the dataset and ``[(hu float32 [H, W], stored [H, W],
    geometry)]`` for the requested frames (all by default; a single-frame file has one)."""
    path = Path(path)
    ds = _dcmread(path, header_only=False)
    return ds, decode_frames(ds, path, frames)


def decode_frames(
    ds: pydicom.Dataset, path: Path | str, frames: Sequence[int] | None = None
) -> list[tuple[np.ndarray, np.ndarray, FrameGeometry]]:
    """:func:`read_frames` on a dataset already read (e.g. received over the network);
    ``path`` names it in errors."""
    from pydicom.pixels import pixel_array

    geometry = frame_geometry(ds, path)
    if "PixelData" not in ds:
        raise DicomError(f"{path}: has no pixel data; {_SKIP_HINT}")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise DicomError(
            f"{path}: SamplesPerPixel {ds.SamplesPerPixel}, not a grey-scale CT image ({_SKIP_HINT})"
        )
    wanted = range(len(geometry)) if frames is None else frames
    out = []
    for f in wanted:
        if not 0 <= f < len(geometry):
            raise DicomError(f"{path}: has {len(geometry)} frame(s), no frame {f}")
        g = geometry[f]
        try:
            # index= decodes only that frame: an Enhanced CT of hundreds of frames is never held whole.
            stored = pixel_array(ds, index=f) if g.frame is not None else ds.pixel_array
        except Exception as exc:  # pydicom: RuntimeError/NotImplementedError (no/failed plugin), ValueError
            raise _decode_error(path, ds, exc) from exc
        if stored.shape != g.shape:
            raise DicomError(
                f"{path}: pixel array shape {stored.shape} != Rows x Columns {g.shape}; {_SKIP_HINT}"
            )
        out.append((to_hu(stored, g), stored, g))
    return out


def read_hu(path: Path | str, frame: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """One CT slice in HU (float32 [H, W]) and its meta: sop_uid, z (position on the slice normal),
    instance, spacing, thickness, modality, shape, frame. A multi-frame file needs ``frame``."""
    path = Path(path)
    if frame is None:
        ds = _dcmread(path, header_only=True)
        n = len(frame_geometry(ds, path))
        if n > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            if n > 1:
                raise DicomError(f"{path}: multi-frame CT with {n} frames; read it with frame=0..{n - 1}")
            frame = 0
    ds, [(hu, _, g)] = read_frames(path, None if frame is None else [frame])
    meta = {
        "sop_uid": str(ds.get("SOPInstanceUID", "")),
        "z": g.along_normal,
        "instance": int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None,
        "spacing": g.spacing,
        "thickness": g.thickness,
        "modality": str(ds.Modality),
        "shape": g.shape,
        "frame": g.frame,
        "position": g.position,
        "orientation": g.orientation,
    }
    return hu, meta
