"""The Storage SCP side of the node: which SOP classes and transfer syntaxes, and C-STORE statuses.

Every storage SOP class is accepted at association negotiation, so that an MR instance in a mixed
association is answered with a DIMSE status (0x0122, SOP class not supported) and the rest of
the association goes on, instead of the whole context being refused. CT Image Storage and
Enhanced CT Image Storage take every transfer syntax pydicom can decode with the pylibjpeg
plugins (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE, deflated, big endian).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from typing import Any

import pydicom
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage

from ldct.data.dicom import DicomError, LocalizerImage, decode_frames, frame_geometry
from ldct.deploy.node.spool import Spool, SpoolError, safe_name

CT_SOP_CLASSES = (str(CTImageStorage), str(EnhancedCTImageStorage))

# PS3.4 Annex B / PS3.7 Annex C statuses the handler answers with.
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


def application_entity(ae_title: str) -> Any:
    """A pynetdicom AE that takes C-ECHO and every storage class (CT ones in every syntax)."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=ae_title)
    for context in AllStoragePresentationContexts:
        syntaxes = ALL_TRANSFER_SYNTAXES if context.abstract_syntax in CT_SOP_CLASSES else None
        ae.add_supported_context(context.abstract_syntax, syntaxes or context.transfer_syntax)
    ae.add_supported_context(Verification)
    # A 100-slice series of 512x512 int16 is ~50 MB; do not cap the PDU or the association count.
    ae.maximum_pdu_size = 0
    ae.maximum_associations = 16
    return ae


def check_instance(data: bytes, sop_uid: str) -> pydicom.Dataset:
    """Decode every frame of a received CT instance, or raise DicomError naming it."""
    label = f"instance {sop_uid}"
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - any parse failure is 'cannot understand'
        raise DicomError(f"{label}: not readable DICOM ({type(exc).__name__}: {exc})") from exc
    try:
        frame_geometry(ds, label)  # header faults (not CT, no rescale) are named as they are
    except LocalizerImage:
        # A scout travels with its series: kept (so the sender sees no failure), not denoised
        # (the denoising step journals it as refused, naming why).
        return ds
    try:
        decode_frames(ds, label)
    except DicomError as exc:
        detail = str(exc).removeprefix(f"{label}: ")
        raise DicomError(f"{label}: pixel data cannot be decoded ({detail})") from exc
    return ds


def store_handler(spool: Spool, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Callable:
    """The EVT_C_STORE handler: the instance is on disk (fsync'd) before success goes back."""

    def handle(event: Any) -> int:
        request = event.request
        sop_class = str(request.AffectedSOPClassUID)
        sop_uid = str(request.AffectedSOPInstanceUID)
        peer = f"{event.assoc.requestor.ae_title}@{event.assoc.requestor.address}"
        if sop_class not in CT_SOP_CLASSES:
            name = getattr(pydicom.uid.UID(sop_class), "name", sop_class)
            log(f"[ldct-node] refused {sop_uid} from {peer}: {name} is not CT (status 0x0122)")
            return SOP_CLASS_NOT_SUPPORTED
        try:
            data = event.encoded_dataset()
        except Exception as exc:  # noqa: BLE001
            log(f"[ldct-node] refused {sop_uid} from {peer}: cannot encode what was received ({exc})")
            return CANNOT_UNDERSTAND
        try:
            ds = check_instance(data, sop_uid)
        except DicomError as exc:
            log(f"[ldct-node] refused {exc} (from {peer}, status 0xC000)")
            return CANNOT_UNDERSTAND
        series, study = str(ds.get("SeriesInstanceUID", "")), str(ds.get("StudyInstanceUID", ""))
        try:
            safe_name(series)
            safe_name(sop_uid)
            if str(ds.get("SOPInstanceUID", "")) != sop_uid:
                raise SpoolError(
                    f"its SOPInstanceUID {ds.get('SOPInstanceUID')!r} differs from the request's"
                )
        except SpoolError as exc:
            log(f"[ldct-node] refused instance {sop_uid} from {peer}: {exc} (status 0xA900)")
            return DATASET_DOES_NOT_MATCH
        try:
            new = spool.store(series, sop_uid, study, data)
        except SpoolError as exc:
            log(f"[ldct-node] refused instance {sop_uid} from {peer}: {exc} (status 0xA700)")
            return OUT_OF_RESOURCES
        state = spool.series.get(series)
        if new and state is not None and len(state.received) == 1:
            log(f"[ldct-node] receiving series {series} from {peer}")
        return SUCCESS

    return handle
