"""Writing CT DICOM: new single-frame slices, derived-series marking, the output transfer syntax.

Shared by the built-in set, ``ldct data simulate`` and ``ldct-best denoise`` so that every series
ldct writes is marked the same way: new UIDs, ImageType DERIVED, a new SeriesNumber,
DerivationDescription, SourceImageSequence and a ContributingEquipmentSequence item naming ldct
and its version.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

import ldct
from ldct.data.dicom import slice_position

# Lossless syntaxes we may re-encode into when asked to keep the input's transfer syntax; the
# encoder must also be installed (RLE: pydicom itself; JPEG 2000 lossless: pylibjpeg-openjpeg).
# Lossy input is never re-encoded lossy: every generation would add its own artefacts.
_LOSSLESS_ENCODABLE = (RLELossless, JPEG2000Lossless)
SERIES_NUMBER_OFFSET = 1000


def output_syntax(input_syntax: str | None, keep: bool) -> tuple[UID, str | None]:
    """(transfer syntax to write, a note when the input's could not be kept)."""
    if not keep or input_syntax is None:
        return ExplicitVRLittleEndian, None
    ts = UID(str(input_syntax))
    if not ts.is_compressed:
        return ts if ts.is_little_endian else ExplicitVRLittleEndian, None
    if ts in _LOSSLESS_ENCODABLE:
        from pydicom.pixels import get_encoder

        if get_encoder(ts).is_available:
            return ts, None
        return (
            ExplicitVRLittleEndian,
            f"no encoder for {ts.name} is installed; wrote Explicit VR Little Endian",
        )
    return ExplicitVRLittleEndian, (
        f"no lossless encoder for {ts.name} ({ts}) here (ldct encodes RLE Lossless and JPEG 2000 "
        f"Lossless); wrote Explicit VR Little Endian"
    )


def save(ds: Dataset, path: Path | str, transfer_syntax: str = ExplicitVRLittleEndian) -> None:
    """Write ``ds`` (uncompressed pixels) to ``path`` in ``transfer_syntax``."""
    ts = UID(str(transfer_syntax))
    if ts.is_compressed:
        ds.compress(ts, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = ts
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def derived_series_number(original: int | str | None, offset: int = SERIES_NUMBER_OFFSET) -> int:
    """A SeriesNumber for a series derived from ``original`` (IS allows up to 2^31 - 1)."""
    try:
        base = int(original) if original not in (None, "") else 0
    except (TypeError, ValueError):
        base = 0
    return (base + offset) % 2**31


def mark_derived(
    ds: Dataset,
    *,
    derivation: str,
    series_number: int,
    sources: Sequence[tuple[str, str]] = (),
    contribution: str = "ldct",
) -> Dataset:
    """Mark ``ds`` as an instance of a derived series (in place; UIDs are set by the caller).

    ImageType DERIVED\\SECONDARY (keeping the input's third value and later, e.g. AXIAL), the new
    SeriesNumber, DerivationDescription, SourceImageSequence for ``sources`` = (SOP class, SOP
    instance) pairs, and a ContributingEquipmentSequence item (ldct, its version, what it did)."""
    image_type = ds.get("ImageType") or []
    image_type = [image_type] if isinstance(image_type, str) else list(image_type)
    ds.ImageType = (
        ["DERIVED", "SECONDARY", *image_type[2:]] if len(image_type) > 2 else ["DERIVED", "SECONDARY"]
    )
    ds.SeriesNumber = int(series_number)
    ds.DerivationDescription = derivation[:1024]
    if sources:
        items = []
        for sop_class, sop_uid in sources:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_uid
            items.append(item)
        ds.SourceImageSequence = DicomSequence(items)
    purpose = Dataset()
    purpose.CodeValue = "109103"  # DICOM CID 7005 "Modifying Equipment"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Modifying Equipment"
    equipment = Dataset()
    equipment.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    equipment.Manufacturer = "ldct"
    equipment.ManufacturerModelName = "ldct"
    equipment.SoftwareVersions = ldct.__version__
    equipment.ContributionDescription = contribution[:1024]
    previous = list(ds.get("ContributingEquipmentSequence") or [])
    ds.ContributingEquipmentSequence = DicomSequence([*previous, equipment])
    return ds


# Patient/study-level attributes carried from a source image into a slice ldct writes.
_CARRIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
    "BodyPartExamined",
    "PatientPosition",
    "Manufacturer",
    "ManufacturerModelName",
    "KVP",
    "ConvolutionKernel",
    "WindowCenter",
    "WindowWidth",
)


def ct_slice(
    stored: np.ndarray,
    *,
    slope: float,
    intercept: float,
    sop_uid: str,
    series_uid: str,
    study_uid: str,
    frame_uid: str,
    series_description: str,
    series_number: int,
    instance: int,
    spacing: Sequence[float],
    position: Sequence[float] | None,
    orientation: Sequence[float] | None = (1, 0, 0, 0, 1, 0),
    thickness: float | None = None,
    patient: str | None = None,
    template: Dataset | None = None,
    image_type: Sequence[str] = ("DERIVED", "SECONDARY", "AXIAL"),
) -> Dataset:
    """A single-frame CT Image dataset (uncompressed) from stored int16/uint16 pixels [H, W].

    ``template`` (a source image) lends its patient/study-level attributes; ``patient`` names the
    patient otherwise. Geometry comes from the arguments, never from the template, since the
    template may be one frame of an Enhanced CT."""
    stored = np.asarray(stored)
    if stored.dtype not in (np.int16, np.uint16):
        raise ValueError(f"stored pixels must be int16 or uint16, got {stored.dtype}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    if template is not None:
        charset = template.get("SpecificCharacterSet")
        if charset:
            ds.SpecificCharacterSet = charset
        for keyword in _CARRIED:
            if template.get(keyword) not in (None, ""):
                ds[keyword] = template[keyword]
    if patient is not None:
        ds.PatientName = patient
        ds.PatientID = patient
    ds.ImageType = list(image_type)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "CT"
    if "Manufacturer" not in ds:
        ds.Manufacturer = "ldct"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    if "StudyID" not in ds:
        ds.StudyID = "1"
    ds.SeriesNumber = int(series_number)
    ds.InstanceNumber = int(instance)
    ds.SeriesDescription = series_description[:64]
    if "KVP" not in ds:
        ds.KVP = 120
    if thickness is not None:
        ds.SliceThickness = f"{thickness:.6g}"
    if position is not None:
        ds.ImagePositionPatient = [f"{v:.6g}" for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [f"{v:.6g}" for v in orientation]
    if position is not None and orientation is not None:
        ds.SliceLocation = f"{slice_position(position, orientation):.6g}"
    ds.PixelSpacing = [f"{v:.6g}" for v in spacing]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
    ds.RescaleIntercept = f"{intercept:.10g}"
    ds.RescaleSlope = f"{slope:.10g}"
    ds.RescaleType = "HU"
    if "WindowCenter" not in ds:
        ds.WindowCenter = 40
        ds.WindowWidth = 400
    ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    return ds


def hu_to_stored(hu: np.ndarray, slope: float, intercept: float, signed: bool) -> np.ndarray:
    """HU -> stored pixels of the given encoding, rounded and clipped to the 16-bit range."""
    dtype = np.dtype(np.int16 if signed else np.uint16)
    info = np.iinfo(dtype)
    stored = np.rint((np.asarray(hu, dtype=np.float64) - intercept) / slope)
    return np.clip(stored, info.min, info.max).astype(dtype)


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
    ds = ct_slice(
        hu_to_stored(hu, 1.0, -1024.0, signed=True),
        slope=1.0,
        intercept=-1024.0,
        sop_uid=sop_uid,
        series_uid=series_uid,
        study_uid=study_uid,
        frame_uid=frame_uid,
        series_description=series_description,
        series_number=series_number,
        instance=instance,
        spacing=spacing,
        position=position,
        thickness=thickness,
        patient=patient,
    )
    ds.Manufacturer = "ldct built-in set"
    save(ds, path)
