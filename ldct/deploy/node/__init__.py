"""The denoiser as a DICOM node: receive a series, denoise it, forward a derived series.

Research software, not a medical device. docs/DESIGN.md §5c: the spool, the journal, recovery,
the statuses the SCP answers with and the tags of the derived series.
"""

from ldct.deploy.node.derive import ModelIdentity
from ldct.deploy.node.forward import Destination, ForwardError
from ldct.deploy.node.service import DicomNode, NodeConfig
from ldct.deploy.node.spool import SeriesState, Spool, SpoolError

__all__ = [
    "Destination",
    "DicomNode",
    "ForwardError",
    "ModelIdentity",
    "NodeConfig",
    "SeriesState",
    "Spool",
    "SpoolError",
]
