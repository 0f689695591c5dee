"""Inference speed of the generator at 512x512 on this machine's CPU, path by path.

For a quick generator (tf_efficientnetv2_b0 encoder) and the paper generator
(tf_efficientnetv2_m), each path is timed at batch 1 (median of repeated runs) and compared with
eager fp32 PyTorch measured in the same run:

    eager fp32 | eager channels_last | torch.compile (inductor, freezing; given up after
    --compile-timeout s) | onnxruntime fp32 (ORT_ENABLE_ALL, 2 intra-op threads) |
    onnxruntime int8 static QDQ (per-channel, Conv only) | torch bf16 autocast (only on CPUs
    with native bf16, or with --bf16: emulated bf16 takes minutes per image)

Other processes share this machine's cores, so the paths are timed round-robin (one call of
each per round, medians over the rounds): a burst of background load then hits every path
alike, and the ratios within one run are the comparable figures.

Every path's output on a real CT slice (pydicom's CT_small, in HU, resized to 512x512) is
compared with eager fp32; a path more than 1 HU off is marked FAIL and cannot be "best".
FLOPs come from torch.utils.flop_counter at 512x512; achieved GFLOP/s are set against a float32
GEMM (torch.matmul 2048^3) timed in the same rounds.

The untrained generator is exactly the identity (its last convolution starts at zero), which
would make every accuracy check trivially pass; the benchmark gives that convolution random
weights scaled so that the residual on the CT slice has an RMS of 10 HU, the size of the
noise a trained model removes. Its BatchNorm statistics are taken from CT data first (see
recalibrate_batchnorm), as a trained model's are. libgomp threads wait passively (see below).

    .venv/bin/python benchmarks/inference.py                 # both models, ~3-7 min on 2 shared cores
    .venv/bin/python benchmarks/inference.py --models quick --no-compile
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Inductor's parallel compile workers would compete with the timed runs for the 2 cores.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# libgomp's threads spin while waiting at a barrier. With 2 threads on 2 cores and any other busy
# process, every one of eager PyTorch's hundreds of parallel regions then waits for a descheduled
# thread: measured here 3.9 s per 512x512 image at 2 threads vs 0.45 s at 1 thread, and 0.4 s at
# 2 threads with passive waiting. Passive waiting (read once, when torch loads) measures the
# paths instead of the scheduler; --omp-active keeps libgomp's default.
if "--omp-active" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ldct.config import HUNormalization  # noqa: E402
from ldct.deploy.export import export_onnx, reference_slice  # noqa: E402
from ldct.deploy.throughput import device_name, library_versions  # noqa: E402

SIZE = 512
TOLERANCE_HU = 1.0
RESIDUAL_RMS_HU = 10.0
GEMM_N = 2048
NORM = HUNormalization()
SPECS = {
    "quick": dict(encoder="tf_efficientnetv2_b0", out_indices=(2, 3, 4), decoder_channels=32),
    "paper": dict(encoder="tf_efficientnetv2_m", out_indices=(2, 3, 4), decoder_channels=64),
}


# ---------------------------------------------------------------------------------- models


class _FallbackGenerator(nn.Module):
    """Used only when ldct.models.generator cannot be imported: timm encoder + top-down decoder."""

    def __init__(self, encoder: str, out_indices: tuple[int, ...], decoder_channels: int) -> None:
        super().__init__()
        import timm

        self.encoder = timm.create_model(encoder, features_only=True, out_indices=out_indices, in_chans=1)
        chans, reds = self.encoder.feature_info.channels(), self.encoder.feature_info.reduction()
        self.pad_multiple = max(reds)
        d = decoder_channels
        self.laterals = nn.ModuleList(nn.Conv2d(c, d, 1) for c in chans)
        self.fuse = nn.ModuleList(nn.Conv2d(d, d, 3, padding=1) for _ in chans[:-1])
        self.head = nn.Sequential(nn.Conv2d(d + 1, 16, 3, padding=1), nn.LeakyReLU(0.2))
        self.out = nn.Conv2d(16, 1, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.pad_multiple
        xp = F.pad(x, (0, (-w) % m, 0, (-h) % m), mode="reflect")
        feats = self.encoder(xp)
        y = self.laterals[-1](feats[-1])
        for i in range(len(feats) - 2, -1, -1):
            lat = self.laterals[i](feats[i])
            y = F.leaky_relu(self.fuse[i](F.interpolate(y, size=lat.shape[-2:], mode="bilinear") + lat), 0.2)
        y = F.interpolate(y, size=xp.shape[-2:], mode="bilinear")
        return x + self.out(self.head(torch.cat([y, xp], 1)))[..., :h, :w]


def build(kind: str) -> tuple[nn.Module, str]:
    spec = SPECS[kind]
    try:
        from ldct.models.generator import Generator

        return Generator(**spec), "ldct.models.generator.Generator"
    except ImportError:
        return _FallbackGenerator(**spec), "benchmark fallback (timm encoder + decoder)"


def recalibrate_batchnorm(model: nn.Module) -> None:
    """Give BatchNorm layers statistics from CT data, as a trained model has.

    A randomly initialised EfficientNetV2-M with identity BN statistics grows activations to ~1e7
    through its 50+ residual blocks; there fp32 rounding alone (NCHW vs channels_last) moves the
    output by ~15 HU and every accuracy check fails for a reason no trained model has. Running
    statistics from the CT slice and its flips bring activations to ~1e3 and that difference to
    ~1e-4 HU.
    """
    hu, _ = reference_slice()
    unit = torch.from_numpy(NORM.to_unit(hu).astype(np.float32))
    batch = torch.stack([unit, unit.flip(0), unit.flip(1), unit.flip(0).flip(1)])[:, None]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        model(batch)
    model.eval()


def make_model(kind: str, x: torch.Tensor, seed: int = 0) -> tuple[nn.Module, str]:
    """The generator, BN-recalibrated, with its last convolution set for a 10 HU RMS residual on x."""
    torch.manual_seed(seed)
    model, source = build(kind)
    recalibrate_batchnorm(model)
    last = getattr(model, "out", None)
    if not isinstance(last, nn.Conv2d):
        last = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.normal_(0.0, 1e-3)
        if last.bias is not None:
            last.bias.zero_()
        # With a zero bias the residual is linear in these weights: one rescale hits the target.
        rms = float((model(x) - x).pow(2).mean().sqrt()) * (NORM.hu_max - NORM.hu_min)
        last.weight.mul_(RESIDUAL_RMS_HU / max(rms, 1e-12))
    return model, source


# ---------------------------------------------------------------------------------- helpers


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return int(counter.get_total_flops())


def ct_slice_512() -> np.ndarray:
    """pydicom's CT_small (128x128, real CT) in HU, bilinearly resized to 512x512."""
    hu, _ = reference_slice()
    t = torch.from_numpy(hu)[None, None]
    return F.interpolate(t, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0].numpy()


def to_hu(unit: np.ndarray) -> np.ndarray:
    return NORM.to_hu(np.asarray(unit, dtype=np.float64))


def interleaved(
    runners: dict[str, Callable[[], object]], rounds: int, slow: set[str], slow_rounds: int
) -> dict[str, list[float]]:
    """Time the runners round-robin so that every path sees the same background load.

    Other processes share these 2 cores; timing one path after the other lets a burst of
    background work land on one path only. Slow paths take part in the first rounds only.
    """
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(rounds):
        for name, fn in runners.items():
            if name in slow and r >= slow_rounds:
                continue
            seconds[name].append(timed(fn)[0])
    return seconds


# ---------------------------------------------------------------------------------- paths


def torch_runner(model: nn.Module, x: torch.Tensor, channels_last: bool = False, dtype=None):
    net = copy.deepcopy(model)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def run():
        with (
            torch.inference_mode(),
            torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None),
        ):
            return net(x).float().numpy()

    return run


def ort_runner(onnx_path: Path, x: np.ndarray, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle ORT threads spin by default; in one process with torch (and interleaved timing) the
    # spinning threads steal the 2 cores from the next torch run and make eager look 5x slower.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"input": x})[0]


class _Calibration:
    """Calibration batches for static quantisation: the CT slice (native 128x128) and variants."""

    def __init__(self) -> None:
        hu, _ = reference_slice()
        unit = NORM.to_unit(hu).astype(np.float32)
        rng = np.random.default_rng(0)
        variants = [unit, unit[::-1], unit[:, ::-1], np.clip(unit + rng.normal(0, 0.005, unit.shape), 0, 1)]
        self._items = iter(
            [{"input": np.ascontiguousarray(v, dtype=np.float32)[None, None]} for v in variants]
        )

    def get_next(self):
        return next(self._items, None)


def quantize_int8(onnx_path: Path, workdir: Path) -> Path:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre, out = workdir / "pre.onnx", workdir / "int8.onnx"
    quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
    # Conv only: the input image and the final residual add stay float. AVX2 without VNNI
    # wants u8 activations and 7-bit weights (reduce_range) to avoid saturating vpmaddubsw.
    quantize_static(
        str(pre),
        str(out),
        _Calibration(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv"],
        per_channel=True,
        reduce_range=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return out


class _CompileTimeout(Exception):
    pass


def compile_runner(model: nn.Module, x: torch.Tensor, timeout_s: float) -> tuple[Callable | None, str]:
    """torch.compile (inductor) of a copy; given up when the first call takes > timeout_s."""
    import torch._inductor.config as inductor_config

    # Freezing turns weights into constants so that inductor can pre-pack convolutions. Layout
    # optimisation would move the convolutions to channels_last, which is slower than NCHW for
    # this network's depthwise convolutions on this CPU (see the channels_last row).
    inductor_config.freezing = True
    inductor_config.layout_optimization = False
    compiled = torch.compile(copy.deepcopy(model))

    def on_alarm(signum, frame):
        raise _CompileTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(timeout_s)))
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            compiled(x)
    except Exception as exc:  # a timeout can arrive wrapped in dynamo's own exceptions
        chain, e = [], exc
        while e is not None:
            chain.append(e)
            e = e.__cause__ or e.__context__
        if any(isinstance(e, _CompileTimeout) for e in chain) or time.perf_counter() - start >= timeout_s:
            return None, f"not compiled within {timeout_s:.0f}s"
        return None, f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

    def run():
        with torch.inference_mode():
            return compiled(x).numpy()

    return run, f"compiled in {time.perf_counter() - start:.0f}s"


def native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ---------------------------------------------------------------------------------- driver


def bench_model(kind: str, args, slice_hu: np.ndarray) -> dict:
    x = torch.from_numpy(NORM.to_unit(slice_hu).astype(np.float32))[None, None]  # [1,1,512,512]
    model, source = make_model(kind, x)
    params = sum(p.numel() for p in model.parameters())
    flops = count_flops(model, x)
    print(
        f"\n=== {kind}: {SPECS[kind]['encoder']} ({source}), {params / 1e6:.1f} M parameters, "
        f"{flops / 1e9:.1f} GFLOP per 512x512 image",
        flush=True,
    )
    with torch.inference_mode():
        reference = to_hu(model(x).numpy())
    residual = reference[0, 0] - np.clip(slice_hu, NORM.hu_min, NORM.hu_max)
    print(
        f"  residual on the CT slice: RMS {np.sqrt(np.mean(residual**2)):.1f} HU, max {np.abs(residual).max():.0f} HU"
    )

    notes: dict[str, str] = {}
    runners: dict[str, Callable[[], np.ndarray]] = {
        "eager fp32": torch_runner(model, x),
        "eager fp32 channels_last": torch_runner(model, x, channels_last=True),
    }
    if args.compile:
        run, notes["torch.compile (inductor)"] = compile_runner(model, x, args.compile_timeout)
        print(f"  torch.compile: {notes['torch.compile (inductor)']}", flush=True)
        if run is not None:
            runners["torch.compile (inductor)"] = run
    bf16 = "torch bf16 autocast ch_last"
    if args.bf16 or native_bf16():
        runners[bf16] = torch_runner(model, x, channels_last=True, dtype=torch.bfloat16)
    else:
        notes[bf16] = (
            "skipped: no native bf16 on this CPU (emulated bf16 took minutes per image; --bf16 forces it)"
        )

    with tempfile.TemporaryDirectory(prefix=f"ldct-bench-{kind}-") as tmp:
        work = Path(tmp)
        onnx_path = work / "model.onnx"
        t, _ = timed(lambda: export_onnx(model, onnx_path))
        print(f"  ONNX export {t:.0f}s", flush=True)
        ort_name = f"onnxruntime fp32 ({args.ort_threads} thr)"
        runners[ort_name] = ort_runner(onnx_path, x.numpy(), args.ort_threads)
        int8 = "onnxruntime int8 static QDQ"
        try:
            t, q = timed(lambda: quantize_int8(onnx_path, work))
            print(f"  int8 static quantisation {t:.0f}s", flush=True)
            runners[int8] = ort_runner(q, x.numpy(), args.ort_threads)
        except Exception as exc:
            notes[int8] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"

        # Two warm-up calls per path: the first gives the output for the accuracy check, the
        # second (past one-off initialisation) sorts out paths too slow for every round.
        rows: dict[str, dict] = {}
        second = {}
        for name, fn in runners.items():
            out = fn()
            second[name], _ = timed(fn)
            rows[name] = {
                "max_err_hu": float(np.abs(to_hu(out) - reference).max()),
                "note": notes.get(name, ""),
            }
            print(
                f"  warm-up {name:<30} {second[name] * 1e3:7.0f} ms   max err {rows[name]['max_err_hu']:.3g} HU",
                flush=True,
            )
        slow = {n for n, sec in second.items() if sec > 4 * second["eager fp32"]}
        a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
        torch.matmul(a, b)
        runners["gemm"] = lambda: torch.matmul(a, b)
        seconds = interleaved(runners, args.rounds, slow, slow_rounds=2)
    peak = 2 * GEMM_N**3 / statistics.median(seconds.pop("gemm")) / 1e9
    for name, values in seconds.items():
        rows[name].update(median_s=statistics.median(values), runs=len(values))
        if name in slow:
            rows[name]["note"] = (rows[name]["note"] + f"; > 4x eager: {len(values)} timed runs").lstrip("; ")
    for name, note in notes.items():
        rows.setdefault(name, {"note": note})

    eager = rows["eager fp32"]["median_s"]
    print(f"\n  float32 GEMM ({GEMM_N}^3 matmul) in the same rounds: {peak:.1f} GFLOP/s")
    print(
        f"  {'path':<30} {'ms':>7} {'FPS':>6} {'x eager':>8} {'GFLOP/s':>8} {'% GEMM':>7} {'max HU err':>11}  accuracy"
    )
    for name, r in rows.items():
        if r.get("median_s") is None:
            print(f"  {name:<30} {'-':>7} {'-':>6} {'-':>8} {'-':>8} {'-':>7} {'-':>11}  {r['note']}")
            continue
        r.update(fps=1.0 / r["median_s"], ratio=eager / r["median_s"], gflops=flops / r["median_s"] / 1e9)
        r["accurate"] = r["max_err_hu"] <= TOLERANCE_HU
        print(
            f"  {name:<30} {r['median_s'] * 1e3:7.0f} {r['fps']:6.2f} {r['ratio']:8.2f} {r['gflops']:8.1f} "
            f"{100 * r['gflops'] / peak:6.0f}% {r['max_err_hu']:11.3g}  "
            f"{'ok' if r['accurate'] else 'FAIL (> 1 HU)'}  {r['note']}".rstrip()
        )
    accurate = {n: r for n, r in rows.items() if r.get("accurate")}
    best = max(accurate, key=lambda n: accurate[n]["ratio"])
    print(
        f"  best accurate path: {best}, {accurate[best]['fps']:.2f} FPS = {accurate[best]['ratio']:.2f}x eager"
    )
    ceiling = peak / rows["eager fp32"]["gflops"]
    print(f"  fp32 ceiling: a path running every FLOP at the GEMM rate would be {ceiling:.2f}x eager")
    return {
        "kind": kind,
        "encoder": SPECS[kind]["encoder"],
        "source": source,
        "params": params,
        "flops": flops,
        "gemm_gflops": peak,
        "rows": rows,
        "best": best,
        "best_ratio": accurate[best]["ratio"],
        "fp32_ceiling_ratio": ceiling,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="quick,paper", help="comma list of: " + ",".join(SPECS))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median over them)")
    parser.add_argument("--ort-threads", type=int, default=2)
    parser.add_argument("--compile-timeout", type=float, default=180.0)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--bf16", action="store_true", help="time bf16 autocast even without native bf16")
    parser.add_argument("--omp-active", action="store_true", help="keep libgomp's spinning wait policy")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    versions = library_versions()
    print(
        f"device: {device_name('cpu')}; torch {versions['torch_version']}, onnxruntime "
        f"{versions['onnxruntime_version']}; load average {os.getloadavg()[0]:.1f}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(libgomp default: active)')}"
    )
    slice_hu = ct_slice_512()
    results = [bench_model(kind.strip(), args, slice_hu) for kind in args.models.split(",") if kind.strip()]
    for r in results:
        if r["kind"] == "paper":
            verdict = "holds" if r["best_ratio"] >= 2.0 else "does NOT hold"
            print(
                f"\ntarget >= 2x eager for the paper generator: {verdict} "
                f"(best accurate path {r['best']}: {r['best_ratio']:.2f}x)"
            )
    print(
        f"\ntotal {time.perf_counter() - start:.0f}s; load average now {os.getloadavg()[0]:.1f} "
        "(other processes share these cores: ratios within one run are the comparable figures)"
    )
    if args.json:
        args.json.write_text(json.dumps({"models": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
