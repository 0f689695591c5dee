"""DICOM series in -> denoised DICOM series out (docs/DESIGN.md §3 and §5).

Every readable CT slice under ``in_dir`` is converted to HU (``pixel * RescaleSlope +
RescaleIntercept``), normalised with the model's own HU window, denoised, converted back to HU and
written under ``out_dir`` at the same relative path, as a new derived series:

- new SeriesInstanceUID (one per input series) and new SOPInstanceUIDs (file meta too);
- ImageType ``DERIVED\\SECONDARY\\...``, SeriesDescription ``"<orig> [ldct denoised]"``,
  DerivationDescription naming the model version / run, SourceImageSequence -> the input slice;
- patient, study, frame of reference and geometry tags unchanged;
- pixels stored with the input's signedness (int16 or uint16), 16 bits, with a slope/intercept
  that represent the model's HU window; values beyond the storable range are clipped;
- uncompressed little-endian transfer syntax (Explicit VR Little Endian when the input was
  compressed).

A file that cannot be used (not DICOM, corrupt, no pixel data, not CT, multi-frame) is reported
with the reason and skipped; the rest is still written. Nothing under ``in_dir`` is modified.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from torch import nn
from tqdm.auto import tqdm

from ldct.data.dicom import DicomError, LocalizerImage, read_frames
from ldct.data.writer import derived_series_number, mark_derived, output_syntax, save
from ldct.deploy.export import load_exported, normalization_from_meta
from ldct.errors import LdctError

SERIES_SUFFIX = " [ldct denoised]"
# SOP classes accepted as single-frame CT images.
_CT_SOP_CLASSES = {CTImageStorage}
_LO_MAX = 64  # SeriesDescription is LO: at most 64 characters


class DenoiseError(LdctError, ValueError):
    """The request itself is unusable (bad directories, no model); per-file problems are skipped."""


class _SkipFile(Exception):
    """One input file cannot be denoised; the message is the reason reported for it."""


def _check_dirs(in_dir: Path, out_dir: Path) -> None:
    if not in_dir.is_dir():
        raise DenoiseError(f"input directory {in_dir} does not exist or is not a directory")
    src, dst = in_dir.resolve(), out_dir.resolve()
    if dst == src or src in dst.parents:
        raise DenoiseError(
            f"output directory {out_dir} is inside (or equal to) the input directory {in_dir}: "
            "choose an output directory outside the input tree (the input is never modified)"
        )
    if dst in src.parents:
        raise DenoiseError(
            f"input directory {in_dir} is inside the output directory {out_dir}: mirrored output "
            "paths could land on input files; choose an output directory outside the input tree"
        )
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise DenoiseError(
            f"output directory {out_dir} exists and is not empty: give a new or empty directory"
        )


@dataclass(frozen=True)
class Denoiser:
    """A loaded model: ``predict`` maps [N,1,H,W] in [0, 1] to the same; ``norm`` maps HU to that
    range and back; ``meta`` is the registered version's meta or the export's model card."""

    predict: Callable[[np.ndarray], np.ndarray]
    norm: Any
    description: str
    backend: str
    meta: dict[str, Any]


def load_denoiser(
    model_dir: str | Path | None = None,
    backend: str = "onnxruntime",
    generator: nn.Module | None = None,
    meta: dict[str, Any] | None = None,
    precision: str = "fp32",
) -> Denoiser:
    """An export bundle on ``backend`` at ``precision``, or an in-memory ``generator`` + ``meta``."""
    if generator is not None:
        if meta is None:
            raise DenoiseError(
                "a generator was given without meta: pass the bundle's meta dict, whose "
                "'normalization' says how HU map to the network input"
            )
        norm = normalization_from_meta(meta)
        net = getattr(generator, "module", generator).eval()
        device = next(net.parameters(), torch.empty(0)).device

        def predict(unit: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return net(torch.from_numpy(unit).to(device)).float().cpu().numpy()

        return Denoiser(predict, norm, _describe(meta), "torch", meta)
    if model_dir is None:
        raise DenoiseError("give model_dir (an export_bundle directory) or a generator with its meta")
    exported = load_exported(model_dir, backend=backend, precision=precision)
    name = exported.backend if precision == "fp32" else f"{exported.backend} {precision}"
    card = dict(exported.card)
    return Denoiser(exported, normalization_from_meta(card), _describe(card), name, card)


def _describe(meta: dict[str, Any]) -> str:
    name = meta.get("registered_model") or meta.get("name") or "ldct-denoiser"
    parts = [f"model {name}"]
    if meta.get("version") is not None:
        parts.append(f"version {meta['version']}")
    if meta.get("run_id"):
        parts.append(f"run {meta['run_id']}")
    if len(parts) == 1:
        parts.append("(unregistered)")
    return " ".join(parts)


def _candidate_files(in_dir: Path) -> list[Path]:
    # Every regular file: DICOM files often have no extension (or .IMA / .dcm); pydicom decides,
    # and whatever it rejects is reported, not silently ignored.
    return sorted(p for p in in_dir.rglob("*") if p.is_file())


def _read_ct(path: Path) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """Dataset, stored pixels [H,W] and HU image [H,W] float32, or _SkipFile with the reason."""
    if path.name.upper() == "DICOMDIR":
        raise _SkipFile("DICOMDIR index file, not an image")
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise _SkipFile(f"not a DICOM file ({exc})") from exc
    except Exception as exc:  # truncated / corrupt files raise many different errors
        raise _SkipFile(f"unreadable DICOM ({type(exc).__name__}: {exc})") from exc
    modality = str(ds.get("Modality", "")).upper()
    sop_class = str(ds.get("SOPClassUID", ""))
    if modality != "CT" and sop_class not in _CT_SOP_CLASSES:
        raise _SkipFile(
            f"not a CT image (Modality={modality or 'missing'}, SOPClassUID={sop_class or 'missing'})"
        )
    if "PixelData" not in ds:
        raise _SkipFile("no pixel data")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise _SkipFile(f"multi-frame image ({ds.NumberOfFrames} frames) is not supported")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise _SkipFile(f"SamplesPerPixel={ds.SamplesPerPixel}: expected a single-channel CT image")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is not None and not ts.is_little_endian:
        raise _SkipFile(f"big-endian transfer syntax {ts.name} is not supported")
    # The one reading path of ldct.data.dicom: compressed syntaxes via the pylibjpeg plugins, and
    # the same strictness as indexing (a missing rescale is an error, never slope 1 / intercept 0).
    try:
        ds, [(hu, pixels, _)] = read_frames(path)
    except LocalizerImage as exc:
        raise _SkipFile(str(exc).split(": ", 1)[-1]) from exc
    except DicomError as exc:
        raise _SkipFile(str(exc).split(": ", 1)[-1]) from exc
    return ds, pixels, hu


def _storage(ds: Dataset, hu_min: float, hu_max: float) -> tuple[np.dtype, float, float, int, int]:
    """Output dtype, slope, intercept and storable range (in stored units) for one slice.

    Keeps the input's signedness and slope. The input's intercept is kept when it represents the
    model's whole HU window [hu_min, hu_max]; otherwise one is chosen that does.
    """
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    dtype = np.dtype(np.int16 if signed else np.uint16)
    lo, hi = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    if slope <= 0:
        slope = 1.0
    if (hu_max - hu_min) / slope > hi - lo:
        slope = (hu_max - hu_min) / (hi - lo)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)

    def fits(b: float) -> bool:
        return (hu_min - b) / slope >= lo and (hu_max - b) / slope <= hi

    if not fits(intercept):
        intercept = 0.0 if fits(0.0) else float(np.floor(hu_min - lo * slope))
    return dtype, slope, intercept, lo, hi


def _to_stored(
    hu: np.ndarray, dtype: np.dtype, slope: float, intercept: float, lo: int, hi: int
) -> np.ndarray:
    stored = np.rint((hu.astype(np.float64) - intercept) / slope)
    return np.clip(stored, lo, hi).astype(dtype)


def derived_dataset(
    ds: Dataset,
    hu_out: np.ndarray,
    hu_in_stored: np.ndarray,
    new_series_uid: str,
    hu_min: float,
    hu_max: float,
    derivation: str,
    sop_uid: str | None = None,
    contribution: str = "ldct-best denoise",
) -> Dataset:
    """Turn the input dataset (a private copy) into the denoised derived instance; a new random
    SOP Instance UID unless ``sop_uid`` is given (the DICOM node's are deterministic)."""
    source_sop_class, source_sop = ds.SOPClassUID, ds.SOPInstanceUID
    dtype, slope, intercept, lo, hi = _storage(ds, hu_min, hu_max)
    stored = _to_stored(hu_out, dtype, slope, intercept, lo, hi)

    # Padding pixels (outside the reconstruction circle) stay padding when the encoding allows it.
    padding = ds.get("PixelPaddingValue")
    same_encoding = slope == float(ds.get("RescaleSlope", 1.0) or 1.0) and intercept == float(
        ds.get("RescaleIntercept", 0.0) or 0.0
    )
    if (
        padding is not None
        and "PixelPaddingRangeLimit" not in ds
        and same_encoding
        and lo <= int(padding) <= hi
    ):
        stored[hu_in_stored == int(padding)] = int(padding)
    elif padding is not None:
        del ds.PixelPaddingValue
        if "PixelPaddingRangeLimit" in ds:
            del ds.PixelPaddingRangeLimit

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    # set_pixel_data: Rows/Columns/Bits*/PixelRepresentation, and Explicit VR Little Endian when the
    # input was compressed; the SOP Instance UID is set below (with the file meta) instead.
    ds.set_pixel_data(stored, photometric, 16, generate_instance_uid=False)
    # Their VR (US/SS) and values belonged to the old pixels.
    for tag in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        if tag in ds:
            del ds[tag]
    ds.RescaleSlope = f"{slope:.10g}"
    ds.RescaleIntercept = f"{intercept:.10g}"
    if "RescaleType" not in ds:
        ds.RescaleType = "HU"

    sop = sop_uid or generate_uid()
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SeriesInstanceUID = new_series_uid

    original = str(ds.get("SeriesDescription", "") or "").strip()
    ds.SeriesDescription = (original[: _LO_MAX - len(SERIES_SUFFIX)] + SERIES_SUFFIX).strip()
    mark_derived(
        ds,
        derivation=derivation,
        series_number=derived_series_number(ds.get("SeriesNumber")),
        sources=[(source_sop_class, source_sop)],
        contribution=contribution,
    )
    now = _dt.datetime.now()
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    return ds


def denoise_series(
    in_dir: str | Path,
    out_dir: str | Path,
    model_dir: str | Path | None = None,
    backend: str = "onnxruntime",
    generator: nn.Module | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    keep_transfer_syntax: bool = False,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Denoise every CT slice under ``in_dir`` into a new derived series under ``out_dir``.

    The model is an exported bundle (``model_dir`` with model.onnx / model.pt / model_card.json,
    ``backend`` "onnxruntime", "torch" or "openvino", at ``precision`` fp32 or bf16 where the CPU
    has it natively) or an in-memory ``generator`` with its ``meta``.
    Returns ``{written, skipped: [(file, reason)], model_version, backend, seconds, series}``;
    ``series`` maps each input SeriesInstanceUID to the new one. ``keep_transfer_syntax``
    writes each slice in its input's transfer syntax where ldct can encode it (RLE, JPEG 2000
    lossless), else uncompressed with a note in ``notes``.
    """
    start = time.perf_counter()
    in_path, out_path = Path(in_dir), Path(out_dir)
    _check_dirs(in_path, out_path)
    denoiser = load_denoiser(model_dir, backend, generator, meta, precision)
    predict, norm, description, backend_name = (
        denoiser.predict,
        denoiser.norm,
        denoiser.description,
        denoiser.backend,
    )
    hu_min, hu_max = float(norm.hu_min), float(norm.hu_max)
    derivation = (
        f"Low-dose CT denoised by ldct ({description}, backend {backend_name}); "
        f"network input HU clipped to [{hu_min:g}, {hu_max:g}] and scaled to [0, 1]"
    )

    written: list[str] = []
    skipped: list[tuple[str, str]] = []
    notes: list[tuple[str, str]] = []
    new_series: dict[str, str] = {}
    files = _candidate_files(in_path)
    for path in tqdm(files, desc="denoise", unit="slice", disable=not progress):
        try:
            ds, stored_in, hu = _read_ct(path)
            ts_in = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
            unit = norm.to_unit(hu).astype(np.float32)[None, None]  # [1,1,H,W] in [0,1]
            try:
                out_unit = np.asarray(predict(unit), dtype=np.float32)
            except Exception as exc:
                raise _SkipFile(f"model failed on this slice ({type(exc).__name__}: {exc})") from exc
            if out_unit.shape != unit.shape or not np.isfinite(out_unit).all():
                raise _SkipFile(f"model output has shape {out_unit.shape} or non-finite values")
            hu_out = norm.to_hu(out_unit[0, 0])
            series_key = str(ds.get("SeriesInstanceUID", "")) or f"dir:{path.parent}"
            series_uid = new_series.setdefault(series_key, generate_uid())
            out_ds = derived_dataset(ds, hu_out, stored_in, series_uid, hu_min, hu_max, derivation)
        except _SkipFile as exc:
            skipped.append((str(path), str(exc)))
            continue
        target = out_path / path.relative_to(in_path)
        ts_out, ts_note = output_syntax(ts_in, keep_transfer_syntax)
        if ts_note:
            notes.append((str(path), ts_note))
        save(out_ds, target, ts_out)
        written.append(str(target))

    return {
        "written": written,
        "skipped": skipped,
        "notes": notes,
        "model_version": description,
        "backend": backend_name,
        "seconds": time.perf_counter() - start,
        "series": new_series,
        "input_dir": str(in_path),
        "output_dir": str(out_path),
    }
