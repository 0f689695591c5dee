"""DDP helpers of the training loop: SyncBatchNorm policy and the cross-rank weights check."""

from __future__ import annotations

from typing import Any

import torch

from ldct.config import Config
from ldct.errors import TrainingError


def sync_bn_enabled(cfg: Config, world_size: int, device: torch.device) -> bool:
    """Whether ``train.sync_bn`` turns the generator's BatchNorm into SyncBatchNorm for this run.

    "auto": on for CUDA runs with more than one worker, where each rank's BN would otherwise see
    batch / workers samples (64 instead of the paper's 128). PyTorch's SyncBatchNorm needs CUDA.
    """
    mode = cfg.train.sync_bn  # one of config.SyncBN: a Config refuses any other at construction
    if mode == "on" and torch.device(device).type != "cuda":
        raise TrainingError(
            "train.sync_bn=on needs CUDA workers (PyTorch's SyncBatchNorm has no CPU kernel): "
            "set train.use_gpu=true or train.sync_bn=off"
        )
    if mode == "auto":
        return torch.device(device).type == "cuda" and world_size > 1
    return mode == "on" and world_size > 1


def weights_spread(nets: Any, device: torch.device) -> float:
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
