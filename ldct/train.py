"""Training of the generator/critic pair: one loop that runs in-process or on N Ray Train workers.

The loop is plain PyTorch (``ldct.engine``); Ray appears only through :class:`RaySession`
(world rank/size, DDP wrapping, report, checkpoint). Batches are addressed by a global counter
(``_StepBatchSampler``) and every iteration re-seeds its RNG from (seed, step, rank), so a run
restored from a checkpoint draws exactly the batches and penalty interpolations it would have
drawn without the interruption.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

# Re-exported: the checkpoint functions moved to ldct.checkpoint; `from ldct.train import ...` works.
from ldct.checkpoint import (  # noqa: F401
    CHECKPOINT_FILE,
    CheckpointError,
    generator_from_state,
    load_state,
    restore_rng,
    save_state,
)
from ldct.config import Config, from_flat, to_flat

PANEL_FILE = "panel.png"
# Metrics every validation reports; the study optimises VAL_METRIC.
VAL_METRIC = "val_psnr_window"


class TrainingError(RuntimeError):
    """A training run failed; the message says why (e.g. a non-finite loss) and where."""


# --------------------------------------------------------------------------------------------- sessions


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


class RaySession:
    """Inside a Ray Train worker: DDP via prepare_model, report/checkpoint via ray.train."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.world_rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        # Every parameter takes part in every loss (no unused-parameter search needed).
        return ray.train.torch.prepare_model(
            module, parallel_strategy_kwargs={"find_unused_parameters": False}
        )

    def load_state(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return load_state(Path(directory))

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


# ------------------------------------------------------------------------------------------- data feed


class _StepBatchSampler(Sampler[list[int]]):
    """Yields the index lists of global batches ``start, start+1, ...``, this rank's share of each.

    Global batch b covers dataset indices [b*B, (b+1)*B); rank r takes a contiguous slice of it.
    Addressing batches by number (not by epoch + shuffle) is what makes resume exact.
    """

    def __init__(self, global_batch: int, rank: int, world_size: int, start_batch: int, total_batches: int):
        if global_batch % world_size:
            raise ValueError(f"train.batch_size={global_batch} is not divisible by {world_size} workers")
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.local = global_batch // world_size
        self.start, self.total = start_batch, total_batches

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start, self.total):
            first = b * self.global_batch + self.rank * self.local
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


# ------------------------------------------------------------------------------------------ checkpoints

# save_state / load_state / generator_from_state live in ldct.checkpoint (imported above).


# ------------------------------------------------------------------------------------------------ loop


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


def train_loop(loop_config: dict[str, Any], session: LocalSession | RaySession | None = None) -> None:
    """The training loop of one worker. ``loop_config``: {"config": flat config, "cache_dir", "splits"}."""
    from ldct.data.patches import PatchPairDataset, SliceDataset
    from ldct.engine import NonFiniteLossError, build_networks, evaluate, train_iteration, unwrap

    session = session or RaySession()
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
    step, batches_consumed, resumed_from = 0, 0, 0
    state = session.load_state()
    if state is not None:
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
        step, batches_consumed = int(state["step"]), int(state["batches_consumed"])
        restore_rng(state.get("rng"))
        resumed_from = step
        if rank == 0:
            print(f"[ldct] resumed at step {step}", flush=True)
    if sync_bn_enabled(cfg, world, device):
        # Same Parameter objects (the optimizer keeps them); BN statistics over the global batch.
        nets.generator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(nets.generator)
    nets.generator = session.wrap(nets.generator)
    if nets.critic is not None:
        nets.critic = session.wrap(nets.critic)

    total_batches = cfg.train.iterations * _batches_per_iteration(cfg) * 2 + 1
    dataset = PatchPairDataset(
        cache_dir,
        splits["train"],
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
    feed = _Feed(iter(loader), device, consumed=batches_consumed)
    val_slices = (
        SliceDataset(
            cache_dir, splits["val"], normalization=cfg.normalization, max_slices=cfg.data.max_val_slices
        )
        if rank == 0
        else None
    )

    meter = _Meter()
    train_seconds = 0.0
    started = time.perf_counter()
    first_step = step
    best = -math.inf
    checkpoint_every = cfg.train.checkpoint_every or cfg.train.val_every
    while step < cfg.train.iterations:
        # Per-iteration RNG: the run is a pure function of (seed, step, rank), resumable exactly.
        torch.manual_seed(cfg.train.seed * 1_000_003 + step * 7919 + rank)
        tick = time.perf_counter()
        try:
            losses = train_iteration(nets, feed, cfg, step + 1)
        except NonFiniteLossError as exc:
            message = (
                f"{exc} (run stopped; worker rank {rank}; "
                f"last good checkpoint at step {step - step % checkpoint_every})"
            )
            print(f"[ldct] {message}", file=sys.stderr, flush=True)
            raise TrainingError(message) from exc
        train_seconds += time.perf_counter() - tick
        step += 1
        meter.add(losses)

        if rank == 0 and (step % cfg.train.log_every == 0 or step == cfg.train.iterations):
            elapsed = time.perf_counter() - started
            rate = (step - first_step) / max(elapsed, 1e-9)
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

        if step % cfg.train.val_every == 0 or step == cfg.train.iterations:
            metrics: dict[str, Any] = {
                "step": step,
                **meter.means(),
                "train_seconds": train_seconds,
                "it_per_s": (step - first_step) / max(time.perf_counter() - started, 1e-9),
                # Where this attempt started: > 0 after a retry restored a checkpoint.
                "resumed_from_step": resumed_from,
                # 1.0: λ₃ weighs a random network (the MLflow writer tags the run, reports say so).
                "perceptual_random": float(
                    cfg.loss.lambda_perceptual != 0 and getattr(nets.perceptual, "random_weights", False)
                ),
            }
            meter = _Meter()
            if world > 1 and rank != 0:
                _weights_spread(nets, device)  # collective: every rank takes part
            with tempfile.TemporaryDirectory(prefix="ldct-ckpt-") as tmp:
                checkpoint_dir = None
                if rank == 0:
                    generator = unwrap(nets.generator)
                    result = evaluate(
                        generator, val_slices, cfg.normalization, device, max_slices=cfg.data.max_val_slices
                    )
                    metrics.update({f"val_{k}": v for k, v in result["denoised"].items()})
                    metrics.update({f"val_ldct_{k}": v for k, v in result["ldct"].items()})
                    metrics["val_gain_psnr_window"] = (
                        metrics["val_psnr_window"] - metrics["val_ldct_psnr_window"]
                    )
                    if cfg.study.pareto:
                        # The second objective, on this worker's own device, after training. Tune
                        # wants it in every result; Optuna reads only the last (multi-objective).
                        from ldct.pareto import trial_fps

                        last = step == cfg.train.iterations
                        metrics.update(
                            trial_fps(generator, device, cfg.study.fps_repeats) if last else {"fps": math.nan}
                        )
                    is_best = metrics[VAL_METRIC] > best
                    best = max(best, metrics[VAL_METRIC])
                    metrics["is_best"] = int(is_best)
                    if world > 1:
                        metrics["weights_spread"] = _weights_spread(nets, device)
                    if step % checkpoint_every == 0 or step == cfg.train.iterations:
                        checkpoint_dir = Path(tmp)
                        save_state(checkpoint_dir, nets, cfg, step, feed.consumed, metrics)
                        _write_panel(generator, val_slices, cfg, device, checkpoint_dir / PANEL_FILE, step)
                session.report(metrics, checkpoint_dir)
            if rank == 0 and step == cfg.train.debug_pause_step and cfg.train.debug_pause_file:
                _debug_pause(Path(cfg.train.debug_pause_file))


def sync_bn_enabled(cfg: Config, world_size: int, device: torch.device) -> bool:
    """Whether ``train.sync_bn`` turns the generator's BatchNorm into SyncBatchNorm for this run.

    "auto": on for CUDA runs with more than one worker, where each rank's BN would otherwise see
    batch / workers samples (64 instead of the paper's 128). PyTorch's SyncBatchNorm needs CUDA.
    """
    mode = cfg.train.sync_bn
    if mode not in ("auto", "on", "off"):
        raise TrainingError(f"train.sync_bn must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "on" and torch.device(device).type != "cuda":
        raise TrainingError(
            "train.sync_bn=on needs CUDA workers (PyTorch's SyncBatchNorm has no CPU kernel): "
            "set train.use_gpu=true or train.sync_bn=off"
        )
    if mode == "auto":
        return torch.device(device).type == "cuda" and world_size > 1
    return mode == "on" and world_size > 1


def _debug_hooks_for_this_run(cfg: Config) -> Config:
    """Checks the ``train.debug_nan_*`` hook and switches it off outside its learning-rate band."""
    from ldct.engine import DEBUG_LOSSES, DEBUG_VALUES

    t = cfg.train
    if not t.debug_nan_step:
        return cfg
    if t.debug_nan_loss not in DEBUG_LOSSES or t.debug_nan_value not in DEBUG_VALUES:
        raise TrainingError(
            f"train.debug_nan_loss must be one of {DEBUG_LOSSES} and train.debug_nan_value one of "
            f"{DEBUG_VALUES}, got {t.debug_nan_loss!r} / {t.debug_nan_value!r}"
        )
    lr = cfg.optim.lr
    if lr < t.debug_nan_min_lr or (t.debug_nan_max_lr > 0 and lr > t.debug_nan_max_lr):
        return _replace_train(cfg, debug_nan_step=0)
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


def _weights_spread(nets: Any, device: torch.device) -> float:
    """Max - min over ranks of a float64 checksum of both networks: 0.0 when DDP kept them equal."""
    import torch.distributed as dist

    total = sum(
        p.detach().double().abs().sum()
        for net in (nets.generator, nets.critic)
        if net is not None
        for p in net.parameters()
    )
    checksum = torch.tensor([float(total)], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    values = [float(g) for g in gathered]
    return max(values) - min(values)


def _write_panel(
    generator: torch.nn.Module, slices: Any, cfg: Config, device: torch.device, path: Path, step: int
) -> None:
    from ldct.plots import save_panel

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
    )


# ------------------------------------------------------------------------------------------ front ends


def prepare_data(cfg: Config) -> tuple[Path, dict[str, list[str]]]:
    """Make sure the cache exists (built-in set made once) before any worker starts."""
    from ldct.data.cache import ensure_data

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


def build_trainer(
    cfg: Config,
    *,
    name: str,
    storage_path: str | os.PathLike[str],
    cache_dir: Path,
    splits: dict[str, list[str]],
    callbacks: list[Any] | None = None,
) -> Any:
    """A Ray Train TorchTrainer for one run (N workers, DDP; gloo on CPU, NCCL on GPU)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    storage_path = storage_uri(storage_path)
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config_for(cfg, cache_dir, splits),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks or None,
            # Worker deaths are retried from the latest checkpoint; a controller that cannot place
            # its workers fails fast instead of waiting forever (2-CPU deadlock, DESIGN.md §5a).
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.study.max_failures, controller_failure_limit=3
            ),
            worker_runtime_env={"env_vars": cpu_thread_env()},
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=VAL_METRIC, checkpoint_score_order="max"
            ),
        ),
    )


def storage_uri(storage: str | os.PathLike[str] | None, default: str = "runs") -> str:
    """Ray storage as one string: a URI (``s3://``, ``gs://``, ``file://``...) kept as it is, a
    local path made absolute (Ray resolves relative paths against each trial's own directory).

    Never a ``Path`` for a URI: ``Path("s3://b/x")`` is ``s3:/b/x``, a local directory.
    """
    text = os.fspath(storage) if storage else default
    if "://" in text:
        scheme, _, rest = text.partition("://")
        rest, query = rest.partition("?")[::2]
        if not rest.strip("/"):
            raise ValueError(f"storage {text!r} names no bucket or path")
        # No trailing slash, so that joins never put "//" into an object key.
        return f"{scheme}://{rest.rstrip('/')}" + (f"?{query}" if query else "")
    return str(Path(text).expanduser().resolve())


def join_storage(base: str, *parts: str) -> str:
    """``base/part/...`` for a storage URI or an absolute path, without pathlib (see storage_uri).

    A URI's query (``?endpoint_override=...``, pyarrow's filesystem options) stays at the end.
    """
    head, sep, query = storage_uri(base).partition("?")
    return "/".join([head, *(p.strip("/") for p in parts)]) + sep + query


def cpu_thread_env() -> dict[str, str]:
    """Environment for processes that run torch on shared CPU cores.

    libgomp's default is to spin waiting threads; with another busy process on 2 cores a 2-thread
    torch step then runs ~10x slower (measured: 0.10 vs 0.98 it/s for the quick profile).
    PASSIVE waiting costs nothing measurable when the cores are free.
    """
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def init_ray(num_cpus: int | None = None) -> None:
    """Join a running cluster if there is one (RAY_ADDRESS / current cluster), else start a local Ray.

    A local Ray gets its State API pinned to its own dashboard (``RAY_API_SERVER_ADDRESS``, which
    the raylet and so every worker inherit). Unpinned, Train V2's placement-group cleaner looks for
    "its" cluster by scanning the machine for GCS processes; with any other Ray on the machine (a
    second study, a test session, a `ray up` head) that scan fails with "Found multiple active Ray
    instances", and a stopped trial's placement group leaks and starves the next (DESIGN.md §5a).
    """
    import ray

    if ray.is_initialized():
        return
    from ldct.remote import running_cluster

    # The dashboard stays on: without it Train V2 cannot free a stopped trial's workers (DESIGN.md §5a).
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if running_cluster() is None:
        port = _free_local_port()
        kwargs["dashboard_port"] = port
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)


def _free_local_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def root_cause(exc: BaseException) -> str:
    """The innermost message of a (Ray-wrapped) exception chain, for a one-line error."""
    text = str(exc)
    for marker in ("NonFiniteLossError", "TrainingError", "DicomError", "ConfigError"):
        if marker in text:
            line = next((ln for ln in text.splitlines()[::-1] if marker in ln), text)
            return line.strip()
    inner = exc.__cause__ or exc.__context__
    return (
        root_cause(inner)
        if inner is not None
        else text.strip().splitlines()[-1]
        if text.strip()
        else repr(exc)
    )


def run_with_ray(
    cfg: Config,
    storage_path: str | os.PathLike[str],
    name: str | None = None,
    callbacks: list[Any] | None = None,
) -> Any:
    """One Ray Train run (``ldct train``): returns the Ray Result (best checkpoint, metrics)."""
    cache_dir, splits = prepare_data(cfg)
    init_ray()
    trainer = build_trainer(
        cfg,
        name=name or f"train-{cfg.profile}-{time.strftime('%Y%m%d-%H%M%S')}",
        storage_path=storage_path,
        cache_dir=cache_dir,
        splits=splits,
        callbacks=callbacks,
    )
    return trainer.fit()


# Test-split scoring moved to ldct.evaluate (DESIGN.md §2); these names stay importable from here.
_MOVED_TO_EVALUATE = ("score_test_split", "format_table")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_EVALUATE:
        from ldct import evaluate as _evaluate

        return getattr(_evaluate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main_train(
    cfg: Config,
    workers: int | None,
    json_out: bool,
    storage: str | None = None,
    tracking_uri: str | None = None,
) -> int:
    """``ldct train``: one run, then the test table. workers=0 trains in this process.

    With a tracking URI (given, or MLFLOW_TRACKING_URI) the run is logged to MLflow experiment
    ``ldct/train``: params, every validation, the best checkpoint and the test table.
    """
    from ldct import tracking

    if workers is not None:
        cfg = _replace_train(cfg, workers=max(workers, 1))
    storage_path = storage_uri(storage or os.environ.get("LDCT_RUNS"))
    started = time.perf_counter()
    name = f"train-{cfg.profile}-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = run_id = None
    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        uri, run_id = tracking.start_training_run(tracking_uri, to_flat(cfg), name)
        print(f"[ldct] MLflow run {run_id} in {uri} (experiment ldct/train)", flush=True)
    try:
        if workers == 0:
            if "://" in storage_path:
                raise TrainingError(
                    f"--workers 0 trains without Ray and needs a local --storage, not {storage_path}"
                )
            session = run_local(cfg, checkpoint_root=Path(storage_path) / f"local-{cfg.profile}")
            best = max(session.reports, key=lambda r: r.get(VAL_METRIC, -math.inf))
            best_dir = next(p for p in session.checkpoints if p.name.endswith(f"{int(best['step']):07d}"))
            if run_id:
                tracking.log_reports(uri, run_id, session.reports)
        else:
            callbacks = [tracking.train_callback(uri, run_id)] if run_id else None
            result = run_with_ray(cfg, storage_path, name=name, callbacks=callbacks)
            if result.error is not None:
                raise result.error
            best_checkpoint = result.best_checkpoints[0][0] if result.best_checkpoints else result.checkpoint
            best_dir = Path(tempfile.mkdtemp(prefix="ldct-best-"))
            best_checkpoint.to_directory(str(best_dir))
    except Exception as exc:  # noqa: BLE001 - one clear line, then the traceback for the curious
        if os.environ.get("LDCT_DEBUG", "") not in ("", "0"):  # `ldct --debug` / LDCT_DEBUG=1
            import traceback

            traceback.print_exc(file=sys.stderr)
        print(f"ldct train: failed: {root_cause(exc)}", file=sys.stderr)
        if run_id:
            tracking.finish_training_run(uri, run_id, None, None, error=root_cause(exc))
        return 1
    generator, _ = generator_from_state(load_state(best_dir))
    from ldct.evaluate import evaluate_generator, format_eval, mean_rows

    full_table = evaluate_generator(generator, cfg, progress=sys.stderr.isatty())
    table = mean_rows(full_table)
    minutes = (time.perf_counter() - started) / 60
    if run_id:
        tracking.finish_training_run(uri, run_id, best_dir, table)
    print(f"\nTest split ({cfg.profile} profile, best checkpoint {best_dir}, {minutes:.1f} min):")
    print(format_eval(full_table))
    if json_out:
        print(json.dumps({k: {m: float(v) for m, v in row.items()} for k, row in table.items()}))
    return 0


def _replace_train(cfg: Config, **changes: Any) -> Config:
    import dataclasses

    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))
