"""One critic step, one generator step and evaluation; plain PyTorch.

No Ray and no MLflow here (docs/DESIGN.md §1): ``ldct.training.loop`` calls these functions inside each Ray
Train worker, tests call them in one process. The generator and critic may arrive wrapped in
``DistributedDataParallel``:

- critic step: one DDP forward on ``cat([real, fake])`` (no batch norm, so batching them is
  exact) and the gradient penalty's double backward through the unwrapped module. Its parameter
  gradients land in the same ``.grad`` tensors during the single ``backward()``, where DDP's
  hooks average them over ranks.
- generator step: the critic is used unwrapped with ``requires_grad`` off, so the critic's
  reducer never waits for gradients that do not come.

Mixed precision (fp16 autocast + GradScaler) and channels_last are used only on CUDA with
``train.precision`` "auto" or "fp16"; CPU runs fp32. Under fp16 a step whose *gradients*
overflow is skipped by the GradScaler (which then lowers its scale); the run stops only when a
*loss* itself is non-finite.

Non-finite losses under DDP: every step all-reduces (MAX) one flag per loss term before any
backward, so when one rank sees a NaN every rank raises the same NonFiniteLossError at the same
step instead of the others waiting in DDP's gradient all-reduce until a timeout.
"""

from __future__ import annotations

import contextlib
import math
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ldct.config import Config, HUNormalization, Precision
from ldct.losses import (
    PerceptualLoss,
    critic_wasserstein,
    generator_adversarial,
    gradient_penalty,
    l1_loss,
)
from ldct.metrics import SOFT_TISSUE_WINDOW, MetricAccumulator
from ldct.models import build_model
from ldct.models.critic import build_critic

# The allowed values come from the config's Literal types (one source; checked at load).
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN/inf; the message names the loss(es), the step and what to try."""

    def __init__(
        self,
        step: int,
        losses: dict[str, float],
        last_checkpoint: str | None = None,
        ranks: dict[str, int] | None = None,
    ) -> None:
        self.step = step
        self.losses = dict(losses)
        self.last_checkpoint = last_checkpoint
        # Under DDP: loss name -> a rank on which it was non-finite (possibly another rank).
        self.ranks = dict(ranks or {})

        def describe(name: str, value: float) -> str:
            shown = str(value) if not math.isfinite(value) else "non-finite"
            return (
                f"{name} ({shown} on rank {self.ranks[name]})" if name in self.ranks else f"{name} ({value})"
            )

        bad = (
            ", ".join(describe(k, v) for k, v in losses.items() if not math.isfinite(v) or k in self.ranks)
            or "loss"
        )
        where = (
            f"last checkpoint {last_checkpoint}"
            if last_checkpoint
            else "resume from the last checkpoint if there is one"
        )
        super().__init__(
            f"non-finite {bad} at step {step}: lower the learning rate (optim.lr) or the loss weights "
            f"(loss.*), or use train.precision=fp32; {where}"
        )

    def __reduce__(self):
        # Keeps the exception picklable across Ray workers despite the custom __init__.
        return (self.__class__, (self.step, self.losses, self.last_checkpoint, self.ranks))


@dataclass
class Networks:
    """Everything one training process updates. ``generator``/``critic`` may be replaced by DDP
    wrappers after building (the optimizers hold the same parameters). ``critic``, ``opt_c`` and
    ``scaler_c`` are None when ``loss.lambda_adv`` is 0 (a pixel-loss run such as RED-CNN)."""

    generator: nn.Module
    critic: nn.Module | None
    perceptual: PerceptualLoss | None  # None when λ₃ = 0: no VGG built, no weights needed
    opt_g: torch.optim.Optimizer
    opt_c: torch.optim.Optimizer | None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: bool = False
    # Disabled (pass-through) scalers unless amp; their state_dicts belong in checkpoints.
    scaler_g: torch.amp.GradScaler | None = None
    scaler_c: torch.amp.GradScaler | None = None

    def __post_init__(self) -> None:
        kind = self.device.type if self.device.type == "cuda" else "cpu"
        if self.scaler_g is None:
            self.scaler_g = torch.amp.GradScaler(kind, enabled=self.amp)
        if self.scaler_c is None and self.critic is not None:
            self.scaler_c = torch.amp.GradScaler(kind, enabled=self.amp)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def use_amp(precision: str, device: torch.device | str) -> bool:
    """fp16 autocast only on CUDA with precision "auto"/"fp16"; never on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.device(device).type == "cuda" and precision in ("auto", "fp16")


def has_critic(cfg: Config) -> bool:
    """A critic exists only with an adversarial term: λ_adv = 0 builds, steps and saves none."""
    return cfg.loss.lambda_adv != 0


def build_networks(cfg: Config, device: torch.device | str) -> Networks:
    """Generator (``model.arch``), critic (unless λ_adv = 0), perceptual loss and their Adam
    optimizers on ``device``.

    Weights are initialised from ``cfg.train.seed`` under a private RNG, so every DDP rank starts
    from the same networks and the caller's RNG stream is untouched.
    """
    device = torch.device(device)
    amp = use_amp(cfg.train.precision, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        generator = build_model(cfg.model, cfg.normalization)
        critic = build_critic(cfg.model, cfg.normalization) if has_critic(cfg) else None
    perceptual = (
        PerceptualLoss(
            cfg.loss.perceptual_net,
            cfg.loss.perceptual_layer,
            cfg.loss.perceptual_weights,
            seed=cfg.train.seed,
            normalization=cfg.normalization,
            allow_random=cfg.loss.allow_random_perceptual,
        )
        if cfg.loss.lambda_perceptual != 0
        else None
    )
    memory_format = torch.channels_last if amp else torch.contiguous_format
    generator = generator.to(device, memory_format=memory_format)
    critic = critic.to(device, memory_format=memory_format) if critic is not None else None
    perceptual = perceptual.to(device, memory_format=memory_format) if perceptual is not None else None
    betas = tuple(cfg.optim.betas)
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.optim.lr, betas=betas)
    opt_c = (
        torch.optim.Adam(critic.parameters(), lr=cfg.optim.lr * cfg.optim.critic_lr_ratio, betas=betas)
        if critic is not None
        else None
    )
    return Networks(generator, critic, perceptual, opt_g, opt_c, device=device, amp=amp)


def _autocast(nets: Networks):
    if not nets.amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=nets.device.type, dtype=torch.float16)


def _to_device(nets: Networks, x: torch.Tensor) -> torch.Tensor:
    x = x.to(nets.device, non_blocking=True).float()
    return x.contiguous(memory_format=torch.channels_last) if nets.amp else x


def _set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _checked(step: int, losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """Loss values as floats; NonFiniteLossError on every rank if any rank saw a NaN/inf.

    Called before any backward/optimizer step. Under DDP one all-reduce (MAX) of a small vector,
    rank+1 where a term is non-finite and 0 elsewhere, tells every rank which term failed where;
    all ranks then raise together (one flag per term, so the message names the loss).
    """
    stacked = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
    flags = (~torch.isfinite(stacked)).float() * (_rank() + 1)
    if _distributed():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    # One device->host copy for values and flags.
    values, flag_values = torch.stack([stacked, flags]).cpu().tolist()
    out = dict(zip(losses, values, strict=True))
    if any(flag_values):
        ranks = (
            {name: int(f) - 1 for name, f in zip(losses, flag_values, strict=True) if f}
            if _distributed()
            else None
        )
        raise NonFiniteLossError(step, out, ranks=ranks)
    return out


def _debug_poison(cfg: Config, step: int, which: str, loss: torch.Tensor) -> torch.Tensor:
    """The test hook of ``train.debug_nan_*``: ``loss`` made NaN/inf at one step on one rank."""
    t = cfg.train
    if t.debug_nan_step <= 0 or step != t.debug_nan_step or t.debug_nan_loss != which:
        return loss
    if t.debug_nan_rank >= 0 and t.debug_nan_rank != _rank():
        return loss
    return loss + float("inf") if t.debug_nan_value == "inf" else loss * float("nan")


def critic_step(
    nets: Networks, low: torch.Tensor, full: torch.Tensor, cfg: Config, step: int, share: float = 1.0
) -> dict[str, float]:
    """One critic update on a batch: ``E[D(fake)] - E[D(real)] + λ_gp·GP``.

    Returns ``loss_critic``, ``wasserstein`` (the distance estimate ``E[D(real)] - E[D(fake)]``)
    and ``gp``. ``share``: this rank's weight in DDP's gradient average (:func:`rank_share`).
    """
    low, full = _to_device(nets, low), _to_device(nets, full)
    critic_module = unwrap(nets.critic)
    _set_requires_grad(critic_module, True)
    with torch.no_grad(), _autocast(nets):
        fake = nets.generator(low)
    fake = fake.float()
    n = full.shape[0]
    with _autocast(nets):
        scores = nets.critic(torch.cat([full, fake])).float()
    wasserstein_loss = critic_wasserstein(scores[:n], scores[n:])
    # The penalty runs in fp32 outside autocast: its double backward would otherwise need the
    # gradient scaler inside autograd.grad as well. It differentiates the critic with respect to
    # its standardised input, so the Lipschitz constraint holds in CT units (models/critic.py).
    standardize = critic_module.standardize
    gp = gradient_penalty(critic_module.score_standardized, standardize(full), standardize(fake))
    loss = _debug_poison(cfg, step, "loss_critic", wasserstein_loss + cfg.loss.lambda_gp * gp)
    values = _checked(step, {"loss_critic": loss, "wasserstein": -wasserstein_loss, "gp": gp})
    nets.opt_c.zero_grad(set_to_none=True)
    nets.scaler_c.scale(loss * share).backward()
    nets.scaler_c.step(nets.opt_c)
    nets.scaler_c.update()
    return values


def generator_step(
    nets: Networks, low: torch.Tensor, full: torch.Tensor, cfg: Config, step: int, share: float = 1.0
) -> dict[str, float]:
    """One generator update: ``λ_adv·adv + λ_l1·L1 + λ_perceptual·perceptual``; ``share`` as in
    :func:`critic_step`.

    ``cfg.train.debug_nan_*`` can make ``loss_g`` (or, in critic_step, ``loss_critic``) NaN/inf
    at one step: a test hook for the non-finite handling all the way up to Ray/Tune.
    """
    low, full = _to_device(nets, low), _to_device(nets, full)
    critic_module = unwrap(nets.critic) if nets.critic is not None else None
    if critic_module is not None:
        _set_requires_grad(critic_module, False)
    w = cfg.loss
    try:
        with _autocast(nets):
            fake = nets.generator(low)
            terms: dict[str, torch.Tensor] = {}
            if critic_module is not None:
                terms["adv"] = generator_adversarial(critic_module(fake).float())
            # A zero weight skips the VGG forward (RED-CNN's pixel-loss profile).
            if w.lambda_perceptual != 0:
                terms["perceptual"] = nets.perceptual(fake, full).float()
        terms["l1"] = l1_loss(fake.float(), full)
        loss = w.lambda_l1 * terms["l1"]
        if "adv" in terms:
            loss = loss + w.lambda_adv * terms["adv"]
        if "perceptual" in terms:
            loss = loss + w.lambda_perceptual * terms["perceptual"]
        loss = _debug_poison(cfg, step, "loss_g", loss)
        values = _checked(step, {"loss_g": loss, **terms})
        nets.opt_g.zero_grad(set_to_none=True)
        nets.scaler_g.scale(loss * share).backward()
        nets.scaler_g.step(nets.opt_g)
        nets.scaler_g.update()
    finally:
        if critic_module is not None:
            _set_requires_grad(critic_module, True)
    return values


def lr_factor(cfg: Config, step: int) -> float:
    """Multiplier of ``optim.lr`` at iteration ``step`` (1-based) under ``optim.schedule``.

    "warmup_cosine": linear from 1/warmup up to 1 over ``optim.warmup`` iterations, then a cosine
    from 1 down to ``optim.min_lr_ratio`` at ``train.iterations``. A pure function of the step, so
    a resumed run follows the same schedule.
    """
    o = cfg.optim  # o.schedule is one of config.Schedule (checked when the Config was made)
    if o.schedule == "constant":
        return 1.0
    if o.warmup > 0 and step <= o.warmup:
        return step / o.warmup
    progress = min(max((step - o.warmup) / max(cfg.train.iterations - o.warmup, 1), 0.0), 1.0)
    return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _apply_schedule(nets: Networks, cfg: Config, step: int) -> None:
    if cfg.optim.schedule == "constant":
        return  # the optimizers keep the lr they were built with
    factor = lr_factor(cfg, step)
    for opt, base in ((nets.opt_g, cfg.optim.lr), (nets.opt_c, cfg.optim.lr * cfg.optim.critic_lr_ratio)):
        if opt is None:
            continue
        for group in opt.param_groups:
            group["lr"] = base * factor


def rank_share(local: int, world: int, global_batch: int) -> float:
    """The factor on a rank's loss that makes DDP's gradient average the global batch's mean.

    DDP averages the ranks' gradients with equal weights; each rank's loss is a mean over its
    own ``local`` samples. When the global batch does not split evenly (an elastic group of 3
    on a batch of 128: 43, 43, 42), weighting each rank by ``local * world / global_batch``
    makes the average exactly the mean over all samples; an even split gives 1.
    """
    return local * world / global_batch


def train_iteration(
    nets: Networks,
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    cfg: Config,
    step: int,
    world: int = 1,
) -> dict[str, float]:
    """``cfg.train.n_critic`` critic steps (a fresh batch each) then one generator step (another
    fresh batch). Critic figures are averaged over its steps; without a critic (λ_adv = 0) only
    the generator step runs. ``world`` > 1: the batches are this rank's share of global batches
    of ``cfg.train.batch_size`` (see :func:`rank_share`). Raises NonFiniteLossError."""
    _apply_schedule(nets, cfg, step)

    def share(batch: torch.Tensor) -> float:
        return rank_share(batch.shape[0], world, cfg.train.batch_size) if world > 1 else 1.0

    critic_logs = []
    for _ in range(cfg.train.n_critic if nets.critic is not None else 0):
        low, full = next_batch()[:2]
        critic_logs.append(critic_step(nets, low, full, cfg, step, share(low)))
    low, full = next_batch()[:2]
    out = generator_step(nets, low, full, cfg, step, share(low))
    if critic_logs:
        for key in critic_logs[0]:
            out[key] = sum(log[key] for log in critic_logs) / len(critic_logs)
    return out


def _as_batch(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(x)
    while t.ndim < 4:
        t = t.unsqueeze(0)
    return t.float()


def _patient_of(item: Any) -> str:
    # A DataLoader with batch 1 collates the info dict's strings into one-element lists.
    info = item[2] if len(item) > 2 and isinstance(item[2], dict) else {}
    patient = info.get("patient", "")
    return str(patient[0] if isinstance(patient, list | tuple) and patient else patient)


@torch.no_grad()
def evaluate(
    generator: nn.Module,
    slices: Iterable[Any],
    normalization: HUNormalization,
    device: torch.device | str,
    max_slices: int = 0,
    windows: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of the LDCT input and of the denoised output against full dose, over whole slices.

    ``slices`` yields ``(low_unit, full_unit, info)`` with images [1,H,W] or [1,1,H,W] (a
    SliceDataset or a DataLoader over it with batch 1); sizes may differ between slices. The
    generator runs in eval mode (then its previous mode is restored); its output is clipped to
    [0,1], the range of the normalisation, before conversion to HU. ``windows``: the body
    metrics' window of each patient (``info["patient"]``); soft tissue for one not in it.
    """
    model = unwrap(generator)
    was_training = model.training
    model.eval()
    device = torch.device(device)
    ldct_acc, out_acc = MetricAccumulator(), MetricAccumulator()
    try:
        for i, item in enumerate(slices):
            if max_slices and i >= max_slices:
                break
            low, full = _as_batch(item[0]).to(device), _as_batch(item[1]).to(device)
            pred = model(low).clamp(0.0, 1.0)
            full_hu = normalization.to_hu(full)
            window = (windows or {}).get(_patient_of(item), SOFT_TISSUE_WINDOW)
            ldct_acc.update(normalization.to_hu(low), full_hu, window)
            out_acc.update(normalization.to_hu(pred), full_hu, window)
    finally:
        model.train(was_training)
    return {"ldct": ldct_acc.mean(), "denoised": out_acc.mean()}
