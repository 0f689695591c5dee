"""The training loop of one worker: runs in-process or on N Ray Train workers.

The loop is plain PyTorch (:mod:`ldct.training.engine`); where it runs is a *session*: the
in-process :class:`LocalSession` here, or ``ldct.training.ray_train.RaySession`` inside a Ray
Train worker (world rank/size, DDP wrapping, report, checkpoint). Batches are addressed by a
global counter (``_StepBatchSampler``) and every iteration re-seeds its RNG from (seed, step,
rank), so a run restored from a checkpoint draws exactly the batches and penalty interpolations
it would have drawn without the interruption.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Sampler

from ldct.config import Config, from_flat, replace, to_flat
from ldct.data.cache import ensure_data
from ldct.data.manifest import body_parts
from ldct.data.patches import PatchPairDataset, SliceDataset
from ldct.deploy.throughput import measure_fps
from ldct.errors import TrainingError
from ldct.metrics import resolve_window
from ldct.plots import save_panel
from ldct.training.checkpoint import load_state, restore_rng, save_state
from ldct.training.ddp import sync_bn_enabled, weights_spread
from ldct.training.engine import (
    NonFiniteLossError,
    build_networks,
    evaluate,
    train_iteration,
    unwrap,
)
from ldct.training.trial_iq import IQ_METRIC, trial_iq

PANEL_FILE = "panel.png"
# Metrics every validation reports; the study optimises VAL_METRIC (and Ray Train keeps the
# checkpoints it ranks best): PSNR inside the body, in each slice's anatomy window.
VAL_METRIC = "val_psnr_body"


class Session(Protocol):
    """Where one worker's loop runs: its rank, device, DDP wrapping, resume state and reports."""

    world_rank: int
    world_size: int
    device: torch.device

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module: ...

    def load_state(self) -> dict[str, Any] | None: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None: ...


class LocalSession:
    """One process, no Ray: reports are kept in memory, checkpoints written to a directory."""

    world_rank = 0
    world_size = 1

    def __init__(
        self,
        checkpoint_root: Path | str | None = None,
        resume_from: Path | str | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.checkpoint_root = Path(checkpoint_root) if checkpoint_root else None
        self.resume_from = Path(resume_from) if resume_from else None
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[Path] = []

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device)

    def load_state(self) -> dict[str, Any] | None:
        if self.resume_from is None:
            return None
        return load_state(self.resume_from)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None and self.checkpoint_root is not None:
            target = self.checkpoint_root / f"checkpoint_{int(metrics['step']):07d}"
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(checkpoint_dir, target)
            self.checkpoints.append(target)


class _StepBatchSampler(Sampler[list[int]]):
    """Yields the index lists of global batches ``start, start+1, ...``, this rank's share of each.

    Global batch b covers dataset indices [b*B, (b+1)*B); rank r takes a contiguous slice of it,
    B // W samples or one more when W does not divide B (the first B % W ranks; each rank's loss
    is weighted by its share, engine.rank_share). Addressing batches by number (not by epoch +
    shuffle) is what makes resume exact, also when an elastic group resumes at another size.
    """

    def __init__(self, global_batch: int, rank: int, world_size: int, start_batch: int, total_batches: int):
        if global_batch < world_size:
            raise ValueError(f"train.batch_size={global_batch} is smaller than {world_size} workers")
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        base, extra = divmod(global_batch, world_size)
        self.local = base + (rank < extra)
        self.offset = rank * base + min(rank, extra)
        self.start, self.total = start_batch, total_batches

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start, self.total):
            first = b * self.global_batch + self.offset
            yield list(range(first, first + self.local))

    def __len__(self) -> int:
        return max(0, self.total - self.start)


@dataclass
class _Feed:
    """Counts the batches the engine consumes, so a checkpoint records the exact stream position."""

    iterator: Iterator
    device: torch.device
    consumed: int = 0

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        low, full = next(self.iterator)[:2]
        self.consumed += 1
        return low.to(self.device, non_blocking=True), full.to(self.device, non_blocking=True)


def _batches_per_iteration(cfg: Config) -> int:
    # n_critic fresh batches for the critic + one for the generator (an upper bound is enough:
    # the sampler only needs to never run dry). No critic (λ_adv = 0): the generator's batch only.
    return (cfg.train.n_critic if cfg.loss.lambda_adv != 0 else 0) + 1


@dataclass
class _Meter:
    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.count += 1

    def means(self) -> dict[str, float]:
        return {f"train_{k}": v / max(self.count, 1) for k, v in self.sums.items()}


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def train_loop(loop_config: dict[str, Any], session: Session) -> None:
    """The training loop of one worker. ``loop_config``: {"config": flat config, "cache_dir", "splits"}."""
    cfg = _debug_hooks_for_this_run(from_flat(loop_config["config"]))
    cache_dir = Path(loop_config["cache_dir"])
    splits: dict[str, list[str]] = loop_config["splits"]
    rank, world = session.world_rank, session.world_size
    device = session.device

    if cfg.train.torch_threads > 0 and device.type == "cpu":
        torch.set_num_threads(cfg.train.torch_threads)
    # Same seed on every rank: identical initial weights, so DDP starts from one model.
    torch.manual_seed(cfg.train.seed)
    nets = build_networks(cfg, device)
    step, batches_consumed = _resume(nets, session.load_state(), rank)
    resumed_from = step
    if sync_bn_enabled(cfg, world, device):
        # Same Parameter objects (the optimizer keeps them); BN statistics over the global batch.
        nets.generator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(nets.generator)
    nets.generator = session.wrap(nets.generator)
    if nets.critic is not None:
        nets.critic = session.wrap(nets.critic)
    feed = _feed(cfg, cache_dir, splits["train"], rank, world, device, batches_consumed)
    val_slices = (
        SliceDataset(
            cache_dir, splits["val"], normalization=cfg.normalization, max_slices=cfg.data.max_val_slices
        )
        if rank == 0
        else None
    )
    val_windows = (
        {p: resolve_window(cfg.data.window, part) for p, part in body_parts(cache_dir, splits["val"]).items()}
        if rank == 0
        else {}
    )

    meter = _Meter()
    clock = _Clock(first_step=step)
    best = -math.inf
    checkpoint_every = cfg.train.checkpoint_every or cfg.train.val_every
    while step < cfg.train.iterations:
        # Per-iteration RNG: the run is a pure function of (seed, step, rank), resumable exactly.
        torch.manual_seed(cfg.train.seed * 1_000_003 + step * 7919 + rank)
        tick = time.perf_counter()
        try:
            losses = train_iteration(nets, feed, cfg, step + 1, world)
        except NonFiniteLossError as exc:
            message = (
                f"{exc} (run stopped; worker rank {rank}; "
                f"last good checkpoint at step {step - step % checkpoint_every})"
            )
            print(f"[ldct] {message}", file=sys.stderr, flush=True)
            raise TrainingError(message) from exc
        clock.train_seconds += time.perf_counter() - tick
        step += 1
        meter.add(losses)
        if rank == 0 and (step % cfg.train.log_every == 0 or step == cfg.train.iterations):
            _log_step(cfg, step, meter, clock)
        if step % cfg.train.val_every == 0 or step == cfg.train.iterations:
            metrics: dict[str, Any] = {
                "step": step,
                **meter.means(),
                "train_seconds": clock.train_seconds,
                "it_per_s": clock.rate(step),
                # Where this attempt started: > 0 after a retry restored a checkpoint.
                "resumed_from_step": resumed_from,
                # 1.0: λ₃ weighs a random network (the MLflow writer tags the run, reports say so).
                "perceptual_random": float(
                    cfg.loss.lambda_perceptual != 0 and getattr(nets.perceptual, "random_weights", False)
                ),
            }
            meter = _Meter()
            best = _validate_and_report(
                cfg, nets, session, (val_slices, val_windows), feed, metrics, best, step, checkpoint_every
            )
            if rank == 0 and step == cfg.train.debug_pause_step and cfg.train.debug_pause_file:
                _debug_pause(Path(cfg.train.debug_pause_file))


@dataclass
class _Clock:
    """Training seconds and the iteration rate of this attempt (a resumed run counts from its start)."""

    first_step: int
    started: float = field(default_factory=time.perf_counter)
    train_seconds: float = 0.0

    def rate(self, step: int) -> float:
        return (step - self.first_step) / max(time.perf_counter() - self.started, 1e-9)


def _resume(nets: Any, state: dict[str, Any] | None, rank: int) -> tuple[int, int]:
    """Load a checkpoint's state into the networks (and the RNG); returns (step, batches consumed)."""
    if state is None:
        return 0, 0
    unwrap(nets.generator).load_state_dict(state["generator"])
    nets.opt_g.load_state_dict(state["opt_g"])
    if nets.critic is not None:
        if "critic" not in state:
            raise TrainingError(
                "the checkpoint to resume has no critic (trained with loss.lambda_adv = 0); "
                "resume it with loss.lambda_adv=0 or start a new run"
            )
        unwrap(nets.critic).load_state_dict(state["critic"])
        nets.opt_c.load_state_dict(state["opt_c"])
    for name in ("scaler_g", "scaler_c"):
        if state.get(name) and getattr(nets, name, None) is not None:
            getattr(nets, name).load_state_dict(state[name])
    restore_rng(state.get("rng"))
    if rank == 0:
        print(f"[ldct] resumed at step {int(state['step'])}", flush=True)
    return int(state["step"]), int(state["batches_consumed"])


def _feed(
    cfg: Config,
    cache_dir: Path,
    patients: list[str],
    rank: int,
    world: int,
    device: torch.device,
    batches_consumed: int,
) -> _Feed:
    """This rank's share of the patch stream, positioned after the batches already consumed."""
    total_batches = cfg.train.iterations * _batches_per_iteration(cfg) * 2 + 1
    dataset = PatchPairDataset(
        cache_dir,
        patients,
        patch_size=cfg.data.patch_size,
        samples=total_batches * cfg.train.batch_size,
        seed=cfg.train.seed,
        max_air_fraction=cfg.data.max_air_fraction,
        normalization=cfg.normalization,
        min_tissue_fraction=cfg.data.min_tissue_fraction,
        sampling=cfg.data.patch_sampling,
        noise_scale=cfg.data.noise_scale,
    )
    sampler = _StepBatchSampler(cfg.train.batch_size, rank, world, batches_consumed, total_batches)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.data.loader_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.data.loader_workers > 0,
    )
    return _Feed(iter(loader), device, consumed=batches_consumed)


def _log_step(cfg: Config, step: int, meter: _Meter, clock: _Clock) -> None:
    rate = clock.rate(step)
    eta = (cfg.train.iterations - step) / rate if rate > 0 else math.inf
    shown = " ".join(
        f"{k}={v:.4g}"
        for k, v in meter.means().items()
        if k.split("_", 1)[1] in ("loss_g", "loss_critic", "l1", "wasserstein")
    )
    print(
        f"[ldct] step {step}/{cfg.train.iterations} {shown} {rate:.2f} it/s ETA {_format_eta(eta)}",
        flush=True,
    )


def _validate_and_report(
    cfg: Config,
    nets: Any,
    session: Session,
    val: tuple[Any, dict[str, tuple[float, float]]],
    feed: _Feed,
    metrics: dict[str, Any],
    best: float,
    step: int,
    checkpoint_every: int,
) -> float:
    """Validation on rank 0 (+ FPS for a Pareto study), a checkpoint when due, then every rank
    reports. ``val``: (the slices, each patient's body-metric window). Returns the best
    validation metric so far."""
    rank, world, device = session.world_rank, session.world_size, session.device
    val_slices, windows = val
    if world > 1 and rank != 0:
        weights_spread(nets, device)  # collective: every rank takes part
    with tempfile.TemporaryDirectory(prefix="ldct-ckpt-") as tmp:
        checkpoint_dir = None
        if rank == 0:
            generator = unwrap(nets.generator)
            result = evaluate(
                generator, val_slices, cfg.normalization, device, cfg.data.max_val_slices, windows
            )
            metrics.update({f"val_{k}": v for k, v in result["denoised"].items()})
            metrics.update({f"val_ldct_{k}": v for k, v in result["ldct"].items()})
            for name in ("psnr_body", "psnr_window"):
                metrics[f"val_gain_{name}"] = metrics[f"val_{name}"] - metrics[f"val_ldct_{name}"]
            # FPS and image quality: after training, on this worker's own device. An objective's
            # key is in every result (Tune checks it); Optuna reads only the last.
            last = step == cfg.train.iterations
            if "fps" in cfg.study.effective_objectives():
                metrics.update(
                    trial_fps(generator, device, cfg.study.fps_repeats) if last else {"fps": math.nan}
                )
            if cfg.study.iq_enabled():
                metrics.update(
                    trial_iq(
                        generator, cfg.normalization, device, cfg.data.builtin_dose, cfg.study.iq_realizations
                    )
                    if last
                    else {IQ_METRIC: math.nan}
                )
            metrics["is_best"] = int(metrics[VAL_METRIC] > best)
            best = max(best, metrics[VAL_METRIC])
            # How many workers trained up to here: with train.min_workers (elastic DDP) the
            # group's size can change at each restart.
            metrics["world_size"] = world
            if world > 1:
                metrics["weights_spread"] = weights_spread(nets, device)
            if step % checkpoint_every == 0 or step == cfg.train.iterations:
                checkpoint_dir = Path(tmp)
                save_state(checkpoint_dir, nets, cfg, step, feed.consumed, metrics)
                _write_panel(generator, val, cfg, device, checkpoint_dir / PANEL_FILE, step)
        session.report(metrics, checkpoint_dir)
    return best


def _debug_hooks_for_this_run(cfg: Config) -> Config:
    """Switches the ``train.debug_nan_*`` hook off outside its learning-rate band (its loss and
    value names are Literals of the config, checked when the Config was made)."""
    t = cfg.train
    if not t.debug_nan_step:
        return cfg
    lr = cfg.optim.lr
    if lr < t.debug_nan_min_lr or (t.debug_nan_max_lr > 0 and lr > t.debug_nan_max_lr):
        return replace(cfg, train={"debug_nan_step": 0})
    return cfg


def _debug_pause(path: Path, limit_s: float = 300.0) -> None:
    """The ``train.debug_pause_*`` hook: the first worker here writes its PID and waits to be killed.

    Exclusive creation makes it one-shot per file: the retried attempt (and any later trial)
    finds the file and goes on. After ``limit_s`` it goes on anyway, so a broken test cannot
    hang a run forever.
    """
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))
    print(f"[ldct] debug pause: pid {os.getpid()} waiting (file {path})", flush=True)
    deadline = time.time() + limit_s
    while time.time() < deadline:
        time.sleep(0.2)


def _write_panel(
    generator: torch.nn.Module,
    val: tuple[Any, dict[str, tuple[float, float]]],
    cfg: Config,
    device: torch.device,
    path: Path,
    step: int,
) -> None:
    slices, windows = val
    low, full, info = slices[0]
    with torch.no_grad():
        was_training = generator.training
        generator.eval()
        out = generator(low[None].to(device)).float().cpu()[0]
        generator.train(was_training)
    to_hu = cfg.normalization.to_hu
    save_panel(
        to_hu(low).numpy(),
        to_hu(out).numpy(),
        to_hu(full).numpy(),
        path,
        title=f"{info.get('patient', '?')} slice {info.get('index', 0)} - step {step}",
        window=windows.get(info.get("patient", "")),
    )


def prepare_data(cfg: Config) -> tuple[Path, dict[str, list[str]]]:
    """Make sure the cache exists (built-in set made once) before any worker starts."""
    cache_dir, splits = ensure_data(cfg.data)
    for split in ("train", "val"):
        if not splits.get(split):
            raise TrainingError(
                f"the {split} split of {cache_dir} is empty: name patients with "
                f"data.val_patients / data.test_patients or add data"
            )
    return Path(cache_dir).resolve(), splits


def loop_config_for(cfg: Config, cache_dir: Path, splits: dict[str, list[str]]) -> dict[str, Any]:
    return {"config": to_flat(cfg), "cache_dir": str(cache_dir), "splits": splits}


def run_local(
    cfg: Config,
    checkpoint_root: Path | str | None = None,
    resume_from: Path | str | None = None,
    device: str = "cpu",
) -> LocalSession:
    """Train in this process (tests, debugging). Returns the session with its reports and checkpoints."""
    cache_dir, splits = prepare_data(cfg)
    session = LocalSession(checkpoint_root, resume_from, device)
    train_loop(loop_config_for(cfg, cache_dir, splits), session)
    return session


def trial_fps(generator: Any, device: Any, repeats: int) -> dict[str, Any]:
    """512×512 batch-1 FPS of ``generator`` on ``device``: the Pareto study's second objective."""
    result = measure_fps(
        generator, str(device), size=512, batch_sizes=(1,), warmup=1, repeats=max(1, repeats)
    )
    # The precision is part of the figure (CUDA measures fp16 autocast, CPU fp32).
    where = f"{result['device']} ({result['device_name']}, {result['precision']})"
    return {"fps": float(result["fps"]), "fps_device": where}
