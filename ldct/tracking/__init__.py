"""MLflow: the store, study/trial/train runs, and the writers that run inside Ray.

``ldct.tracking.MLflowStudyCallback`` was the class's path before the package split; Tune
pickles its callbacks with a study, so that name must keep resolving for a study started by an
older version to resume. It is looked up lazily: importing ``ldct.tracking.store`` (``ldct-best
show``, ``ldct eval --model``) must not import Ray Tune.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "MLflowStudyCallback":
        from ldct.tracking.callbacks import MLflowStudyCallback

        return MLflowStudyCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
