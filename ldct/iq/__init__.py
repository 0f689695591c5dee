"""Task-based image quality: noise power spectrum, task transfer function, model observers.

Pure numpy/scipy on HU arrays: no torch, no data loading (``ldct iq`` reads files, the
phantoms live in ``ldct.data.iq_phantoms``, the per-method table in ``ldct.evaluation.iq``).
docs/DESIGN.md §3a gives the conventions.
"""

from ldct.iq.nps import IQError, NPSResult, nps, remove_ensemble_mean
from ldct.iq.observers import detectability
from ldct.iq.ttf import TTFResult, ttf_from_rod

__all__ = [
    "IQError",
    "NPSResult",
    "TTFResult",
    "detectability",
    "nps",
    "remove_ensemble_mean",
    "ttf_from_rod",
]
