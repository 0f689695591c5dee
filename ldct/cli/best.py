"""``ldct-best``: the registered model: show, validate (+ promote), export, denoise, migrate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldct.cluster import RemoteError, connect
from ldct.config import apply_overrides, from_flat
from ldct.deploy.denoise import denoise_series
from ldct.deploy.export import export_bundle
from ldct.deploy.validate import validate_paths
from ldct.evaluation.denoisers import torch_denoiser
from ldct.evaluation.iq import guard_message, lcd_guard
from ldct.registry.gpu_worker import validate_on_gpu_worker
from ldct.registry.load import load_registered, migrate
from ldct.registry.promotion import PromotionError, decide, plan_validation, record_iq_guard
from ldct.registry.versions import CHAMPION, list_versions


def cmd_migrate(args: argparse.Namespace) -> int:
    new = migrate(args.version, args.tracking_uri)
    moved = ", ".join(sorted(new.aliases)) or "none"
    print(f"re-registered v{args.version} as v{new.version} (safetensors + pyfunc); aliases moved: {moved}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    rows = list_versions(args.tracking_uri)
    if not rows:
        print("ldct-best: no registered versions of ldct-denoiser (run a study first)", file=sys.stderr)
        return 1
    columns = [
        "version",
        "aliases",
        "study",
        "trial",
        "model",
        "val_psnr_body",
        "val_ssim_body",
        "val_psnr_window",
        "val_ssim_window",
        "fps",
        "fps_device",
        "format",
    ]
    table = [[",".join(r[c]) if isinstance(r[c], list) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    import torch

    if args.on_cluster:
        try:
            connect()  # before loading anything: no cluster is a two-second answer, not a hang
        except RemoteError as exc:
            print(f"ldct-best validate: {exc}", file=sys.stderr)
            return 2
    try:
        plan = plan_validation(
            args.backend,
            args.precision,
            args.min_fps,
            args.device,
            args.on_cluster,
            torch.cuda.is_available(),
        )
    except PromotionError as exc:
        print(f"ldct-best validate: {exc}", file=sys.stderr)
        return 2
    generator, meta = load_registered(
        alias=args.alias if args.version is None else None,
        version=args.version,
        tracking_uri=args.tracking_uri,
    )
    cfg = apply_overrides(from_flat(meta["config"]), args.overrides)
    if args.iq_guard:
        # Before the timing: a model that makes a low-contrast insert harder to see than its
        # input is refused whatever its speed (docs/DESIGN.md §3a).
        verdict = lcd_guard(
            torch_denoiser(generator, cfg.normalization), dose=cfg.data.builtin_dose, mode=args.iq_guard
        )
        record_iq_guard(meta["version"], verdict, args.tracking_uri)
        print(guard_message(verdict), file=sys.stdout if verdict["passed"] else sys.stderr)
        if not verdict["passed"]:
            print("FAIL: the image-quality guard refused this version; aliases unchanged", file=sys.stderr)
            return 1
    print(
        f"validating ldct-denoiser v{meta['version']} on {plan.device}: paths "
        f"{', '.join(f'{b} {p}' for b, p in plan.paths)} (bar {plan.min_fps:g} FPS at "
        f"{args.size}x{args.size}, batch 1)..."
    )
    if args.on_cluster:
        try:
            report = validate_on_gpu_worker(
                generator, cfg, plan.paths, repeats=args.repeats, size=args.size, timeout_s=args.gpu_timeout
            )
        except RemoteError as exc:
            print(f"ldct-best validate: {exc}", file=sys.stderr)
            return 1
    else:
        report = validate_paths(generator, cfg, plan.paths, repeats=args.repeats, size=args.size)
    decision = decide(meta["version"], report, plan.min_fps, args.tracking_uri)
    print(decision.message, file=sys.stdout if decision.promoted else sys.stderr)
    return 0 if decision.promoted else 1


def cmd_export(args: argparse.Namespace) -> int:
    alias = args.alias or (None if args.version else CHAMPION)
    generator, meta = load_registered(alias=alias, version=args.version, tracking_uri=args.tracking_uri)
    report = export_bundle(generator, meta, Path(args.out), force=args.force)
    print(
        f"exported ldct-denoiser v{meta['version']} to {args.out}: "
        f"{', '.join(sorted(report.get('files', [])))}; max error vs torch: onnxruntime "
        f"{report['parity_max_abs_hu']:.4f} HU, openvino {report['parity']['max_abs_hu_openvino']:.4f} HU"
    )
    return 0


def cmd_denoise(args: argparse.Namespace) -> int:
    generator = meta = None
    if args.alias:
        generator, meta = load_registered(alias=args.alias, tracking_uri=args.tracking_uri)
    elif not args.model:
        print("ldct-best denoise: give --model DIR (an export) or --alias NAME", file=sys.stderr)
        return 2
    report = denoise_series(
        args.input,
        args.output,
        model_dir=args.model,
        backend="torch" if generator is not None else args.backend,
        generator=generator,
        meta=meta,
        precision=args.precision,
    )
    print(f"wrote {len(report['written'])} slices to {args.output} ({report['seconds']:.1f} s)")
    for path, reason in report["skipped"]:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return 0 if report["written"] else 1
