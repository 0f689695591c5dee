"""Training state on disk: written and read as plain data, so that loading one never runs code.

A checkpoint is one ``torch.save`` file holding only tensors, numbers, strings, booleans, None
and lists/tuples/dicts of those (docs/DESIGN.md §4). It is read with ``torch.load(weights_only=True)``,
whose unpickler refuses any other object: a file crafted to run code when unpickled (a shared
S3/NFS/MLflow store is writable by others) is refused with a :class:`CheckpointError` before
anything in it executes. The RNG and data-stream state are stored in the same form (byte
tensors and integers), so a resumed run needs nothing else.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ldct.config import Config, from_flat, to_flat
from ldct.errors import LdctError
from ldct.models import build_model
from ldct.training.engine import unwrap

CHECKPOINT_FILE = "state.pt"
FORMAT = "ldct-checkpoint-2"
# Format 1 (before the RNG / data-stream sections) held only plain data as well: still readable.
READABLE_FORMATS = ("ldct-checkpoint-1", FORMAT)


class CheckpointError(LdctError, ValueError):
    """A checkpoint is missing, not plain data, or not an ldct checkpoint; the message says which file."""


def plain(value: Any, where: str = "state") -> Any:
    """``value`` as plain data (numpy/torch scalars become Python numbers); anything else raises.

    Run before saving, so a checkpoint that would need ``weights_only=False`` is never written.
    """
    if value is None or isinstance(value, bool | int | float | str | torch.Tensor):
        return value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}, not str/int")
            out[key] = plain(item, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple):
        items = [plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalar
        return value.item()
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__name__}: a checkpoint holds tensors, "
        f"numbers, strings and lists only (it must load with weights_only=True)"
    )


def rng_state() -> dict[str, Any]:
    """Torch's CPU (and, if in use, CUDA) generator states as uint8 tensors."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Any] | None) -> None:
    """Inverse of :func:`rng_state` (a checkpoint without one leaves the generators as they are)."""
    if not state:
        return
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(
    directory: Path, nets: Any, cfg: Config, step: int, batches_consumed: int, metrics: dict[str, Any]
) -> Path:
    """Write a resumable checkpoint (generator, critic if any, their optimizers, step, config,
    normalisation, RNG and data-stream position); returns the file."""

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "generator": unwrap(nets.generator).state_dict(),
        "opt_g": nets.opt_g.state_dict(),
        # fp16 loss scales (empty on CPU): without them a CUDA run would not resume exactly.
        "scaler_g": nets.scaler_g.state_dict() if getattr(nets, "scaler_g", None) else {},
        "step": int(step),
        "batches_consumed": int(batches_consumed),
        # Batches are addressed by number (train._StepBatchSampler): the position plus what
        # defines the stream is the whole data-loader state.
        "data_stream": {
            "batches_consumed": int(batches_consumed),
            "seed": int(cfg.train.seed),
            "global_batch": int(cfg.train.batch_size),
        },
        "rng": rng_state(),
        "config": to_flat(cfg),
        "normalization": {"hu_min": cfg.normalization.hu_min, "hu_max": cfg.normalization.hu_max},
        "perceptual_weights": str(getattr(nets.perceptual, "weights_source", "n/a")),
        "metrics": metrics,
    }
    if getattr(nets, "critic", None) is not None:
        # No critic (λ_adv = 0): no critic keys at all, so the file says what was trained.
        state["critic"] = unwrap(nets.critic).state_dict()
        state["opt_c"] = nets.opt_c.state_dict()
        state["scaler_c"] = nets.scaler_c.state_dict() if getattr(nets, "scaler_c", None) else {}
    state = plain(state)
    tmp = directory / (CHECKPOINT_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, directory / CHECKPOINT_FILE)
    return directory / CHECKPOINT_FILE


def load_state(path: Path | str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_state` (a directory or the state file itself).

    Only plain data is accepted (``weights_only=True``); anything else is a :class:`CheckpointError`.
    """
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {file}: expected a directory holding {CHECKPOINT_FILE}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"refused to load {file}: it is not plain data that loads with weights_only=True "
            f"({first}). Checkpoints hold tensors, numbers, strings and lists only; this file was "
            f"not written by ldct's save_state (or is damaged). Do not load it with "
            f"weights_only=False: unpickling can run arbitrary code."
        ) from exc
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{file} is not an ldct checkpoint (format {found!r}; expected one of {READABLE_FORMATS})"
        )
    return state


def generator_from_state(state: dict[str, Any]) -> tuple[torch.nn.Module, Config]:
    """Rebuild the generator from a checkpoint's own config (never from flags) and load its weights."""
    return generator_from_config(state["config"], state["generator"])


def generator_from_config(
    flat_config: dict[str, Any], weights: dict[str, torch.Tensor]
) -> tuple[torch.nn.Module, Config]:
    """The generator a flat config describes, with ``weights`` loaded (strictly), in eval mode."""
    cfg = from_flat(flat_config)
    # Through the registry (model.arch; old configs without it are the default architecture).
    # The weights are given: no encoder weights need to be found (or downloaded) again.
    generator = build_model(dataclasses.replace(cfg.model, encoder_weights="none"), cfg.normalization)
    generator.load_state_dict(weights)
    return generator.eval(), cfg
