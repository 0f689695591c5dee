"""Before anything starts: every input a profile needs (weights, data, storage, MLflow), all at once.

``ldct train --profile paper --check`` and ``studies/loss_weights.py --check`` print what
:func:`check_inputs` finds, so that a fresh cluster reports every missing piece in one go instead
of failing on the first one twenty minutes into a study. Nothing here downloads or writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ldct.cluster import storage_uri
from ldct.config import Config
from ldct.losses import _weights_enum, cached_imagenet_file
from ldct.models.generator import _HF_FILENAMES, _cached_encoder_file
from ldct.tracking.store import TrackingError, check_reachable, resolve_tracking_uri


@dataclass(frozen=True)
class Weights:
    """One ImageNet weights file a profile asks for, and where the offline loaders look for it."""

    what: str
    found: Path | None
    looked: tuple[str, ...]
    # How to fetch it on a machine with internet: a Hugging Face repo/file, or a URL.
    hf_repo: str | None = None
    hf_filename: str | None = None
    url: str | None = None


def required_weights(cfg: Config) -> list[Weights]:
    """The ImageNet files ``cfg`` needs on disk (none for random/none/explicit-path weights)."""
    out: list[Weights] = []
    if cfg.model.encoder_weights == "imagenet":
        import timm

        found, looked = _cached_encoder_file(cfg.model.encoder)
        pre = timm.models.get_pretrained_cfg(cfg.model.encoder)
        out.append(
            Weights(
                f"ImageNet weights of encoder {cfg.model.encoder}",
                found,
                tuple(looked),
                hf_repo=getattr(pre, "hf_hub_id", None),
                hf_filename=getattr(pre, "hf_hub_filename", None) or _HF_FILENAMES[0],
                url=getattr(pre, "url", None) or None,
            )
        )
    if cfg.loss.perceptual_weights == "imagenet" and cfg.loss.lambda_perceptual > 0:
        path = cached_imagenet_file(cfg.loss.perceptual_net)
        out.append(
            Weights(
                f"ImageNet weights of perceptual net {cfg.loss.perceptual_net}",
                path if path.is_file() else None,
                (str(path),),
                url=_weights_enum(cfg.loss.perceptual_net).url,
            )
        )
    return out


def _storage_problem(storage: str, timeout: float) -> str | None:
    if "YOUR-BUCKET" in storage or "XXXXXXXX" in storage:
        return f"storage {storage} is the profile's placeholder: give --storage or --set study.storage=..."
    if "://" not in storage:
        path = Path(storage)
        parent = next((p for p in (path, *path.parents) if p.exists()), None)
        if parent is None or not os.access(parent, os.W_OK):
            return f"storage {storage}: {parent} is not writable"
        return None
    if storage.startswith("file://"):
        return _storage_problem(storage[len("file://") :], timeout)
    # A remote URI: ask its filesystem (pyarrow, as Ray does) whether the prefix can be listed.
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as FutureTimeout

    import pyarrow.fs

    def probe() -> None:
        fs, path = pyarrow.fs.FileSystem.from_uri(storage)
        fs.get_file_info(path)

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(probe).result(timeout=timeout)
    except FutureTimeout:
        return f"storage {storage} did not answer within {timeout:g} s (credentials, endpoint, network?)"
    except Exception as exc:  # noqa: BLE001 - any failure of the probe is the answer
        return f"storage {storage} cannot be reached: {str(exc).splitlines()[0][:300]}"
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return None


def check_inputs(
    cfg: Config, storage: str | None = None, tracking_uri: str | None = None, timeout: float = 10.0
) -> list[str]:
    """Every missing input of ``cfg``, one line each with what to do; empty when all are there."""
    problems = []
    fetch = f"python scripts/fetch_weights.py --profile {cfg.profile or 'PROFILE'}"
    for weights in required_weights(cfg):
        if weights.found is None:
            problems.append(
                f"{weights.what} not on disk (looked in {'; '.join(weights.looked)}): run `{fetch}` "
                f"(downloads; or --from DIR to copy them from a share)"
            )
    for key, value in (("model.encoder_weights", cfg.model.encoder_weights),
                       ("loss.perceptual_weights", cfg.loss.perceptual_weights)):  # fmt: skip
        if value not in ("imagenet", "none", "random", "auto") and not Path(value).is_file():
            problems.append(f"{key}={value}: no such file")
    if cfg.data.root:
        root = Path(cfg.data.root)
        has_cache = bool(cfg.data.cache) and (Path(cfg.data.cache) / "manifest.json").is_file()
        if not root.is_dir() and not has_cache:
            problems.append(
                f"data.root {root} does not exist (and data.cache {cfg.data.cache or '-'} holds no "
                f"manifest.json): mount the share or --set data.root=/path/to/the/DICOM/tree"
            )

    problem = _storage_problem(storage_uri(storage or cfg.study.storage or None), timeout)
    if problem:
        problems.append(problem)

    uri = resolve_tracking_uri(tracking_uri or cfg.study.tracking_uri or None)
    try:
        check_reachable(uri, timeout=timeout)
    except TrackingError as exc:
        problems.append(str(exc))
    return problems


def report(cfg: Config, storage: str | None = None, tracking_uri: str | None = None) -> int:
    """Print the check; 0 when every input is there, 1 otherwise."""
    problems = check_inputs(cfg, storage, tracking_uri)
    name = cfg.profile or "this"
    if not problems:
        print(f"{name} profile: every input is in place (weights, data, storage, MLflow)")
        return 0
    print(f"{name} profile: {len(problems)} missing input(s):")
    for problem in problems:
        print(f"  - {problem}")
    return 1
