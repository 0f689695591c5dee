"""Training-step speed and memory of the quick-profile model and of the paper generator.

    .venv/bin/python benchmarks/train_step.py                 # quick model, then the paper model
    .venv/bin/python benchmarks/train_step.py --skip-paper --encoders resnet10t,resnet18

For each model: one ``train_iteration`` = ``n_critic`` critic steps + 1 generator step (the real
engine functions, random [0,1] patches: speed does not depend on the data). Printed:

- generator iterations/s and critic steps/s from wall-clock time: the best of ``--repeats``
  timing blocks (the CPU is shared; slow blocks are other people's load), and the process CPU
  seconds per iteration (closer to a load-independent cost; with 2 threads on a busy machine it
  also counts OpenMP spin-waiting, so compare it at ``--threads 1``);
- peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak resident set size
  of this process (Linux ``VmHWM``), reset before each model through ``/proc/self/clear_refs``
  so the figure is per model, minus the RSS before the model was built (freed heap is handed
  back with ``malloc_trim`` between models, and a throwaway warm-up run absorbs one-time
  library allocations). Without clear_refs (non-Linux) it falls back to ``ru_maxrss`` growth,
  which only shows a model that peaks higher than everything before it. tracemalloc cannot
  see torch's allocations.

The paper generator (tf_efficientnetv2_m, decoder 64, critic 64, VGG relu5_4, n_critic 4) runs
with a smaller batch on CPU (``--paper-batch``, default 4; the paper uses 128 on GPUs).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldct.config import Config, ConfigError, load_config, replace  # noqa: E402
from ldct.training.engine import build_networks, train_iteration

# The quick profile recommended for 2 CPU cores, used when studies/quick.toml does not exist.
QUICK_DEFAULTS = {
    "model": {
        "encoder": "resnet10t",
        "out_indices": (2, 3, 4),
        "decoder_channels": 32,
        "critic_channels": 16,
    },
    "loss": {"perceptual_layer": 3, "perceptual_weights": "random", "lambda_adv": 1e-3},
    "optim": {"lr": 1e-3, "critic_lr_ratio": 1.0},
    "train": {"batch_size": 16, "n_critic": 1},
}
PAPER = {
    "model": {
        "encoder": "tf_efficientnetv2_m",
        "out_indices": (2, 3, 4),
        "decoder_channels": 64,
        "critic_channels": 64,
    },
    "loss": {"perceptual_layer": 35, "perceptual_weights": "random"},
    "train": {"n_critic": 4},
}


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _release() -> None:
    """Return freed heap to the OS (glibc keeps it otherwise, and the next model's RSS baseline
    would include the previous model's retained memory)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(cfg: Config, label: str, patch: int, iters: int, repeats: int, device: torch.device) -> dict:
    """Time ``iters`` train_iterations ``repeats`` times (after 2 warm-up iterations)."""
    batch, n_critic = cfg.train.batch_size, cfg.train.n_critic
    _release()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    can_reset = _reset_peak()
    rss0 = _rss_kib("VmRSS") or 0
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    nets = build_networks(cfg, device)
    gen = torch.Generator().manual_seed(0)
    low = torch.rand(batch, 1, patch, patch, generator=gen)
    full = (low + 0.01 * torch.randn(low.shape, generator=gen)).clamp(0, 1)

    def next_batch():
        return low, full

    step = 1
    for _ in range(2):
        train_iteration(nets, next_batch, cfg, step)
        step += 1
    walls, cpus = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        w, c = time.perf_counter(), time.process_time()
        for _ in range(iters):
            train_iteration(nets, next_batch, cfg, step)
            step += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        walls.append((time.perf_counter() - w) / iters)
        cpus.append((time.process_time() - c) / iters)

    if device.type == "cuda":
        peak_mib, how = torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    elif can_reset:
        peak_mib, how = ((_rss_kib("VmHWM") or 0) - rss0) / 1024, "VmHWM - RSS before build"
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss0) / 1024
        how = "ru_maxrss growth (lower bound)"
    best = min(walls)
    g_params = sum(p.numel() for p in nets.generator.parameters()) / 1e6
    c_params = sum(p.numel() for p in nets.critic.parameters()) / 1e6
    result = {
        "label": label,
        "encoder": cfg.model.encoder,
        "batch": batch,
        "n_critic": n_critic,
        "it_per_s": 1.0 / best,
        "critic_steps_per_s": n_critic / best,
        "s_per_it_all": walls,
        "cpu_s_per_it": min(cpus),
        "peak_mib": peak_mib,
        "peak_how": how,
        "generator_mparams": g_params,
        "critic_mparams": c_params,
    }
    del nets
    _release()
    return result


def _print(r: dict, cfg: Config) -> None:
    walls = ", ".join(f"{s:.2f}" for s in r["s_per_it_all"])
    print(
        f"{r['label']}: {r['encoder']} (G {r['generator_mparams']:.2f}M, critic {r['critic_mparams']:.2f}M), "
        f"decoder {cfg.model.decoder_channels}, critic ch {cfg.model.critic_channels}, "
        f"VGG layer {cfg.loss.perceptual_layer}, batch {r['batch']}, n_critic {r['n_critic']}\n"
        f"    {r['it_per_s']:.3f} generator it/s, {r['critic_steps_per_s']:.3f} critic steps/s "
        f"(best block; s/it per block: {walls}); {r['cpu_s_per_it']:.2f} CPU s/it; "
        f"peak memory {r['peak_mib']:.0f} MiB ({r['peak_how']})",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3, help="iterations per timing block")
    ap.add_argument("--repeats", type=int, default=2, help="timing blocks; the best one is reported")
    ap.add_argument("--encoders", default="", help="comma list: time the quick profile with these encoders")
    ap.add_argument("--batch", type=int, default=0, help="override the quick batch size")
    ap.add_argument("--n-critic", type=int, default=-1, help="override the quick n_critic")
    ap.add_argument("--paper-batch", type=int, default=4, help="paper model batch (CPU: small)")
    ap.add_argument("--paper-iters", type=int, default=1)
    ap.add_argument("--skip-paper", action="store_true")
    ap.add_argument(
        "--ddp", action="store_true", help="also time the quick profile under Ray Train, 1 vs 2 workers"
    )
    ap.add_argument("--ddp-iters", type=int, default=40, help="iterations per Ray Train run")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        quick = load_config("quick")
        source = "studies/quick.toml"
    except ConfigError:  # no quick profile (yet): the recommendation below
        quick = replace(Config(), **QUICK_DEFAULTS)
        source = "benchmarks/train_step.py QUICK_DEFAULTS"
    overrides = {}
    if args.batch:
        overrides["batch_size"] = args.batch
    if args.n_critic >= 0:
        overrides["n_critic"] = args.n_critic
    if overrides:
        quick = replace(quick, train=overrides)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
        f"patch {args.patch}x{args.patch}; quick config from {source}",
        flush=True,
    )
    encoders = [e for e in args.encoders.split(",") if e] or [quick.model.encoder]
    # One-time process costs (oneDNN kernels, thread pools, allocator arenas) land on whichever
    # model runs first: pay them with a throwaway run so that every figure is the model's own.
    measure(replace(quick, model={"encoder": encoders[0]}), "warm-up", args.patch, 1, 1, device)
    for enc in encoders:
        cfg = replace(quick, model={"encoder": enc})
        _print(measure(cfg, "quick", args.patch, args.iters, args.repeats, device), cfg)
    if not args.skip_paper:
        cfg = replace(Config(), **{**PAPER, "train": {**PAPER["train"], "batch_size": args.paper_batch}})
        _print(measure(cfg, "paper", args.patch, args.paper_iters, 1, device), cfg)
    if args.ddp:
        ddp_comparison(quick, args.ddp_iters)
    return 0


def ddp_comparison(quick: Config, iters: int) -> None:
    """The quick profile as real Ray Train runs (gloo DDP) with 1 and 2 workers, same global batch.

    On 2 cores, 1 worker gets 2 torch threads and 2 workers 1 thread each, so the ratio shows what
    DDP's gradient all-reduce costs on top of splitting the batch, not extra hardware.
    """
    import tempfile

    import ray

    from ldct.training.loop import prepare_data
    from ldct.training.ray_train import build_trainer

    cache_dir, splits = prepare_data(quick)
    ray.init(num_cpus=2, log_to_driver=False)
    rates = {}
    for workers, cpus, threads in ((1, 1.0, 2), (2, 1.0, 1)):
        cfg = replace(
            quick,
            train={
                "workers": workers,
                "cpus_per_worker": cpus,
                "torch_threads": threads,
                "iterations": iters,
                "val_every": iters,
                "log_every": iters,
            },
        )
        with tempfile.TemporaryDirectory() as storage:
            result = build_trainer(
                cfg, name=f"ddp-bench-{workers}", storage_path=storage, cache_dir=cache_dir, splits=splits
            ).fit()
        rates[workers] = result.metrics["it_per_s"]
        print(
            f"Ray Train quick profile, {workers} worker(s) x {threads} thread(s), global batch "
            f"{cfg.train.batch_size}: {rates[workers]:.3f} generator it/s "
            f"(train_seconds {result.metrics['train_seconds']:.1f} for {iters} it)",
            flush=True,
        )
    print(f"2 workers / 1 worker: {rates[2] / rates[1]:.2f}x", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
