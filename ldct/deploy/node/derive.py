"""One received series -> its derived, denoised series, with UIDs that do not change on a rerun.

The derived Series and SOP Instance UIDs are hashes of the source UIDs and the model's DeviceUID:
a series denoised again after a crash, or resent by the PACS, gets the same UIDs, so the
destination stores each derived instance once. An Enhanced CT (multi-frame) instance becomes one
single-frame CT Image per frame, since the denoised frames are written as classic slices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import ldct
from ldct.data.dicom import FrameGeometry, read_frames
from ldct.data.writer import ct_slice, derived_series_number, hu_to_stored, mark_derived, save
from ldct.deploy.denoise import SERIES_SUFFIX, Denoiser, derived_dataset

_LO_MAX = 64


@dataclass(frozen=True)
class ModelIdentity:
    """How the derived instances name the model: one DeviceUID per registered version."""

    name: str  # e.g. "ldct-denoiser v3"
    device_uid: str
    software_version: str

    @classmethod
    def of(cls, meta: dict) -> ModelIdentity:
        """From a registered version's (or export card's) meta: name, version and run id.

        The DeviceUID hashes all three, so it is stable across node restarts and machines and
        differs between versions, and between two stores that both have a "version 1".
        """
        model = str(meta.get("registered_model") or meta.get("name") or "ldct-denoiser")
        version = meta.get("version")
        run_id = str(meta.get("run_id") or "")
        name = f"{model} v{version}" if version is not None else model
        uid = generate_uid(entropy_srcs=["ldct DeviceUID", model, str(version), run_id])
        return cls(name=name[:_LO_MAX], device_uid=str(uid), software_version=f"ldct {ldct.__version__}")


def derived_series_uid(source_series: str, model: ModelIdentity) -> str:
    return str(generate_uid(entropy_srcs=["ldct derived series", source_series, model.device_uid]))


def derived_sop_uid(source_sop: str, frame: int | None, model: ModelIdentity) -> str:
    return str(generate_uid(entropy_srcs=["ldct derived instance", source_sop, str(frame), model.device_uid]))


def name_the_model(ds: Dataset, model: ModelIdentity) -> Dataset:
    """DeviceUID and the ldct ContributingEquipmentSequence item name the model version."""
    ds.DeviceUID = model.device_uid
    item = ds.ContributingEquipmentSequence[-1]
    item.Manufacturer = "ldct"
    item.ManufacturerModelName = model.name
    item.SoftwareVersions = model.software_version
    item.DeviceUID = model.device_uid
    return ds


def _predict_hu(denoiser: Denoiser, hu: np.ndarray) -> np.ndarray:
    unit = denoiser.norm.to_unit(hu).astype(np.float32)[None, None]
    out = np.asarray(denoiser.predict(unit), dtype=np.float32)
    if out.shape != unit.shape or not np.isfinite(out).all():
        raise ValueError(f"model output has shape {out.shape} or non-finite values")
    return denoiser.norm.to_hu(out[0, 0])


def derive_instance(
    source: Path,
    denoiser: Denoiser,
    model: ModelIdentity,
    series_uid: str,
    write: Callable[[str, Callable[[Path], None]], Path],
) -> list[str]:
    """Denoise one received instance; ``write(sop_uid, writer)`` stores each derived instance.

    Returns the derived SOP Instance UIDs. Raises DicomError/ValueError naming ``source`` when
    the instance cannot be denoised (the rest of its series goes on).
    """
    ds, frames = read_frames(source)
    hu_min, hu_max = float(denoiser.norm.hu_min), float(denoiser.norm.hu_max)
    derivation = (
        f"Low-dose CT denoised by ldct ({denoiser.description}, backend {denoiser.backend}); "
        f"network input HU clipped to [{hu_min:g}, {hu_max:g}] and scaled to [0, 1]; "
        "for research use, not for diagnosis"
    )
    multi = len(frames) > 1 or frames[0][2].frame is not None
    written: list[str] = []
    for index, (hu, stored, geometry) in enumerate(frames):
        try:
            hu_out = _predict_hu(denoiser, hu)
        except Exception as exc:  # noqa: BLE001 - any runner failure is this instance's failure
            raise ValueError(
                f"{source.name}: the model failed on frame {index} ({type(exc).__name__}: {exc})"
            ) from exc
        sop = derived_sop_uid(str(ds.SOPInstanceUID), geometry.frame if multi else None, model)
        if multi:
            out = _frame_as_slice(ds, hu_out, geometry, index, sop, series_uid, derivation)
        else:
            # ds was read for this call alone: derived_dataset may change it in place.
            out = derived_dataset(
                ds, hu_out, stored, series_uid, hu_min, hu_max, derivation, sop_uid=sop,
                contribution="ldct-best listen",
            )  # fmt: skip
        name_the_model(out, model)
        write(sop, lambda path, out=out: save(out, path, ExplicitVRLittleEndian))
        written.append(sop)
    return written


def _frame_as_slice(
    ds: Dataset,
    hu: np.ndarray,
    geometry: FrameGeometry,
    index: int,
    sop: str,
    series_uid: str,
    derivation: str,
) -> Dataset:
    original = str(ds.get("SeriesDescription", "") or "").strip()
    out = ct_slice(
        hu_to_stored(hu, 1.0, -1024.0, signed=True),
        slope=1.0,
        intercept=-1024.0,
        sop_uid=sop,
        series_uid=series_uid,
        study_uid=str(ds.StudyInstanceUID),
        frame_uid=str(ds.get("FrameOfReferenceUID") or generate_uid()),
        series_description=(original[: _LO_MAX - len(SERIES_SUFFIX)] + SERIES_SUFFIX).strip(),
        series_number=derived_series_number(ds.get("SeriesNumber")),
        instance=index + 1,
        spacing=geometry.spacing,
        position=geometry.position,
        orientation=geometry.orientation,
        thickness=geometry.thickness,
        template=ds,
    )
    source = Dataset()
    source.ReferencedSOPClassUID = ds.SOPClassUID
    source.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    source.ReferencedFrameNumber = index + 1
    mark_derived(
        out,
        derivation=derivation,
        series_number=derived_series_number(ds.get("SeriesNumber")),
        contribution="ldct-best listen",
    )
    out.SourceImageSequence = DicomSequence([source])
    return out


__all__ = [
    "ModelIdentity",
    "derive_instance",
    "derived_series_uid",
    "derived_sop_uid",
    "name_the_model",
]
