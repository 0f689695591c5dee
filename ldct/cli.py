"""Command-line front ends: ``ldct <group> <command>`` and ``ldct-best``.

Thin argparse wrappers over library functions. Each command group is added by its own
``_add_<group>_commands(sub)`` function; handlers import what they need lazily, so ``ldct --help``
and the data commands start fast (Ray, MLflow and timm take seconds to import).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


# --------------------------------------------------------------------------- data


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="DICOM trees, the HU cache, the built-in set, LDCT baselines")
    cmds = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    p = cmds.add_parser(
        "builtin",
        help="write the built-in DICOM set (phantoms + real CT slices, simulated quarter dose) in Mayo layout",
    )
    p.add_argument("out", help="output directory (missing, empty, or a previous built-in tree)")
    p.add_argument(
        "--dose", type=float, default=0.25, help="low-dose fraction of the full dose (default 0.25)"
    )
    p.add_argument("--phantoms", type=int, default=6, help="number of phantom patients PH01.. (default 6)")
    p.add_argument("--slices", type=int, default=4, help="slices per phantom (default 4)")
    p.add_argument("--size", type=int, default=256, help="phantom image size in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_data_builtin)

    p = cmds.add_parser("index", help="read a DICOM tree once into the per-patient HU cache (incremental)")
    p.add_argument("root", help="DICOM root (Mayo 2016 or TCIA LDCT-and-Projection-data layout)")
    p.add_argument("--cache", required=True, help="cache directory (arrays + manifest.json)")
    p.add_argument("--thickness", default="3mm", help="Mayo series thickness: 3mm or 1mm (default 3mm)")
    p.add_argument("--skip-bad", action="store_true", help="skip and list bad files instead of stopping")
    p.add_argument("--val", nargs="+", default=[], metavar="P", help="validation patients")
    p.add_argument("--test", nargs="+", default=[], metavar="P", help="test patients")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_data_index)

    p = cmds.add_parser(
        "simulate",
        help="routine-dose CT (any layout or a plain folder) -> Mayo-layout full/quarter pairs",
        description="Simulate a lower dose from routine-dose CT with the projection-domain, "
        "dose-corrected noise insertion of the built-in set. Writes OUT/<patient>/{full,quarter}_<t>mm/; "
        "never writes into IN.",
    )
    p.add_argument("input", metavar="IN", help="input directory (Mayo/TCIA tree or any folder of CT slices)")
    p.add_argument("output", metavar="OUT", help="output directory (missing or empty)")
    p.add_argument("--dose", type=float, default=0.25, help="dose fraction to simulate (default 0.25)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; the same seed gives identical files")
    p.add_argument(
        "--i0", type=float, default=None, help="full-dose flux per ray at 180 views (default 1.5e5)"
    )
    p.add_argument(
        "--electronic-noise", type=float, default=None, help="electronic noise std in counts (default 10)"
    )
    p.add_argument("--skip-bad", action="store_true", help="skip and list bad files instead of stopping")
    p.add_argument(
        "--keep-transfer-syntax",
        action="store_true",
        help="write the input's transfer syntax where ldct can encode it (RLE, JPEG 2000 lossless)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_data_simulate)

    p = cmds.add_parser("baseline", help="LDCT-vs-full-dose metrics of a split (per patient and mean)")
    p.add_argument("cache", help="cache directory")
    p.add_argument("--split", default="test", help="train, val or test (default test)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_cmd_data_baseline)


def _cmd_data_builtin(args: argparse.Namespace) -> int:
    from ldct.data.builtin import REAL_PATIENTS, write_builtin

    out = write_builtin(
        args.out,
        dose=args.dose,
        phantoms=args.phantoms,
        slices=args.slices,
        size=args.size,
        seed=args.seed,
        progress=not args.quiet,
    )
    real = sorted(REAL_PATIENTS)
    print(
        f"built-in set in {out}: {args.phantoms + len(real)} patients (PH01..PH{args.phantoms:02d}, "
        f"{', '.join(real)}), dose {args.dose:g}"
    )
    return EXIT_OK


def _cmd_data_index(args: argparse.Namespace) -> int:
    from ldct.data.cache import build_cache

    manifest = build_cache(
        args.root,
        args.cache,
        mayo_thickness=args.thickness,
        skip_bad=args.skip_bad,
        val=args.val,
        test=args.test,
        progress=not args.quiet,
    )
    slices = sum(e["shape"][0] for e in manifest.patients.values())
    print(
        f"cache {args.cache}: {len(manifest.patients)} patients, {slices} slice pairs "
        f"({manifest.layout} layout, {manifest.source})"
    )
    for split in ("train", "val", "test"):
        print(f"  {split:5s} {', '.join(manifest.splits[split]) or '-'}")
    notes = [n for e in manifest.patients.values() for n in e.get("notes", [])]
    for _, note in notes:
        print(f"note: {note}")
    skipped = [s for e in manifest.patients.values() for s in e.get("skipped", [])] + manifest.skipped
    if skipped:
        print(f"skipped {len(skipped)}:")
        for path, reason in skipped:
            print(f"  {path}: {reason}")
    return EXIT_OK


def _cmd_data_simulate(args: argparse.Namespace) -> int:
    from ldct.data.simulate import ELECTRONIC_NOISE, I0_FULL_DOSE, simulate_tree

    report = simulate_tree(
        args.input,
        args.output,
        dose=args.dose,
        seed=args.seed,
        i0=I0_FULL_DOSE if args.i0 is None else args.i0,
        electronic_noise=ELECTRONIC_NOISE if args.electronic_noise is None else args.electronic_noise,
        skip_bad=args.skip_bad,
        keep_transfer_syntax=args.keep_transfer_syntax,
        progress=not args.quiet,
    )
    patients = sorted({Path(f["full"]).parts[0] for f in report["files"]})
    print(
        f"simulated dose {args.dose:g} (seed {args.seed}) for {len(report['files'])} slices of "
        f"{len(patients)} patient(s) in {args.output}: {', '.join(patients)}"
    )
    for _, note in report["notes"]:
        print(f"note: {note}")
    if report["skipped"]:
        print(f"skipped {len(report['skipped'])}:")
        for path, reason in report["skipped"]:
            print(f"  {path}: {reason}")
    thicknesses = sorted({Path(f["full"]).parts[1].removeprefix("full_") for f in report["files"]})
    print(f"index it with: ldct data index {args.output} --cache CACHE --thickness {thicknesses[0]}")
    return EXIT_OK


def _format_baseline(table: dict) -> str:
    cols = ("psnr_window", "ssim_window", "psnr_full", "ssim_full", "rmse_hu")
    head = f"{'patient':12s} {'slices':>6s} " + " ".join(f"{c:>11s}" for c in cols)
    lines = [
        f"LDCT vs full dose, split {table['split']!r} (window [-160, 240] HU; full [-1024, 3072] HU)",
        head,
    ]

    def row(name: str, slices: int, m: dict) -> str:
        return f"{name:12s} {slices:6d} " + " ".join(
            f"{m[c]:11.2f}" if c.startswith("psnr") or c == "rmse_hu" else f"{m[c]:11.4f}" for c in cols
        )

    lines += [row(r["patient"], r["slices"], r) for r in table["patients"]]
    lines.append(row("mean", table["mean"]["slices"], table["mean"]))
    return "\n".join(lines)


def _cmd_data_baseline(args: argparse.Namespace) -> int:
    from ldct.data.cache import baseline_table

    table = baseline_table(args.cache, split=args.split)
    print(json.dumps(table, indent=1) if args.json else _format_baseline(table))
    return EXIT_OK


# ------------------------------------------------------------------------------------------ ldct train


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="one training run (Ray Train), then the test-split table",
        description="Train the generator/critic pair with a profile, then score the test split: "
        "LDCT input, a Gaussian filter tuned on validation, and the denoised output.",
    )
    p.add_argument("--profile", default="quick", help="studies/<name>.toml or a .toml path (default: quick)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a profile value (repeatable)",
    )
    p.add_argument("--data", help="a cache directory made by `ldct data index` (default: the built-in set)")
    p.add_argument("--workers", type=int, help="Ray Train workers (0 = train in this process, no Ray)")
    p.add_argument("--storage", help="where Ray keeps runs and checkpoints (default ./runs)")
    p.add_argument("--json", action="store_true", help="end with one JSON line: ldct / classical / denoised")
    p.add_argument(
        "--check",
        action="store_true",
        help="only report every missing input (weights, data, storage, MLflow)",
    )
    p.add_argument(
        "--tracking-uri",
        help="log the run to this MLflow store (default: MLFLOW_TRACKING_URI if set, else no logging)",
    )
    p.set_defaults(handler=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from ldct.config import apply_overrides, load_config
    from ldct.train import main_train

    cfg = load_config(args.profile, args.overrides)
    if args.data:
        cfg = apply_overrides(cfg, [f"data.cache={Path(args.data).resolve()}"])
    if args.check:
        from ldct.preflight import report

        return report(cfg, storage=args.storage, tracking_uri=args.tracking_uri)
    return main_train(
        cfg, workers=args.workers, json_out=args.json, storage=args.storage, tracking_uri=args.tracking_uri
    )


# ----------------------------------------------------------------------------------------- ldct report


def _add_report_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="leaderboard, plots and best panel of a study, from MLflow")
    p.add_argument("study", help="study name (study.name of its profile, e.g. quick)")
    p.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--out", default="results", help="results root (default ./results)")
    p.add_argument("--profile", help="profile whose data scores the best trial on the test split")
    p.set_defaults(handler=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from ldct.config import load_config
    from ldct.report import write_report

    cfg = load_config(args.profile) if args.profile else None
    out = write_report(args.study, tracking_uri=args.tracking_uri, results_root=args.out, cfg=cfg)
    print((out / "leaderboard.md").read_text())
    print(f"written: {out}")
    return 0


# ------------------------------------------------------------------------------------------- ldct eval


def _add_eval_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="every method on one split: LDCT, Gaussian, BM3D (tuned on val) and a model",
        description="Score one split of a cache, one table per slice and the mean ± std over slices, "
        "in both metric conventions: the LDCT input, a Gaussian filter and BM3D (each tuned on the "
        "validation split, never on the scored one) and, if given, a model.",
    )
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data", help="a cache directory made by `ldct data index`")
    data.add_argument("--profile", help="use this profile's data (default: quick's built-in set)")
    p.add_argument("--split", default="test", help="train, val or test (default test)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="URI", help="registry URI, e.g. models:/ldct-denoiser@champion")
    src.add_argument(
        "--model-version", "--version", dest="model_version", metavar="V", help="registry version number"
    )
    src.add_argument("--checkpoint", metavar="DIR", help="a training checkpoint directory (state.pt)")
    src.add_argument("--onnx", metavar="DIR", help="an export directory (from `ldct-best export`)")
    p.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--no-bm3d", action="store_true", help="leave BM3D out (8-14 s of CPU per 512x512 slice)")
    p.add_argument(
        "--tune-slices",
        type=int,
        default=None,
        help="validation slices used to tune Gaussian/BM3D (default 4)",
    )
    p.add_argument(
        "--tune-crop",
        type=int,
        default=None,
        help="tune on each validation slice's central NxN px (default: the profile's data.tune_crop, "
        "0 = whole slices; with --data 0)",
    )
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from ldct import evaluate

    tune_crop = 0
    if args.data:
        cache = Path(args.data)
        if not (cache / "manifest.json").is_file():
            raise FileNotFoundError(
                f"{cache} is not a cache (no manifest.json): make one with `ldct data index ROOT --cache {cache}`"
            )
    else:
        from ldct.config import load_config
        from ldct.data.cache import ensure_data

        data_cfg = load_config(args.profile or "quick").data
        cache, _ = ensure_data(data_cfg)
        tune_crop = data_cfg.tune_crop
    denoiser, label = None, "model"
    if args.model or args.model_version or args.checkpoint or args.onnx:
        denoiser, label = evaluate.load_denoiser(
            model=args.model,
            version=args.model_version,
            checkpoint=args.checkpoint,
            onnx=args.onnx,
            tracking_uri=args.tracking_uri,
        )
    kwargs: dict[str, Any] = {"tune_crop": tune_crop if args.tune_crop is None else args.tune_crop}
    if args.tune_slices is not None:
        kwargs["tune_slices"] = args.tune_slices
    table = evaluate.evaluate_cache(
        cache,
        args.split,
        denoiser=denoiser,
        model_label=label,
        bm3d=not args.no_bm3d,
        progress=not args.quiet and sys.stderr.isatty(),
        **kwargs,
    )
    print(json.dumps(table, indent=1) if args.json else evaluate.format_eval(table))
    return EXIT_OK


# ------------------------------------------------------------------------------ ldct study / profiles


def _add_study_commands(sub: argparse._SubParsersAction) -> None:
    # The study parses its own options (ldct.study.main), so `ldct study --help` shows them.
    p = sub.add_parser("study", help="run (or --resume) the loss-weight study", add_help=False)
    p.set_defaults(handler=_cmd_study, passthrough=True)

    p = sub.add_parser("repeat", help="a configuration x N seeds: mean ± std, paired test", add_help=False)
    p.set_defaults(handler=_cmd_repeat, passthrough=True)

    p = sub.add_parser("profiles", help="list the named profiles and the files they load from")
    p.set_defaults(handler=_cmd_profiles)


def _cmd_study(args: argparse.Namespace) -> int:
    from ldct.study import main as study_main

    return study_main(args.passthrough_args, prog="ldct study")


def _cmd_repeat(args: argparse.Namespace) -> int:
    from ldct.repeat import main as repeat_main

    return repeat_main(args.passthrough_args, prog="ldct repeat")


def _cmd_profiles(args: argparse.Namespace) -> int:
    from ldct.config import list_profiles

    profiles = list_profiles()
    if not profiles:
        print("no profiles found (the package's ldct/profiles/ is missing)", file=sys.stderr)
        return EXIT_ERROR
    width = max(len(n) for n in profiles)
    for name, path in profiles.items():
        # The first comment line of a profile says what it is for.
        first = next(
            (ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), ""
        )
        print(f"{name:<{width}}  {path}  {first}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------- ldct-best


def best_main(argv: Sequence[str] | None = None) -> int:
    """``ldct-best``: the registered model: show, validate (throughput) + promote, export, denoise."""
    _quiet_cpu_threads()
    parser = argparse.ArgumentParser(prog="ldct-best", description="The registered ldct-denoiser model.")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    _add_global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("show", help="registered versions with aliases, metrics and FPS")
    p.set_defaults(handler=_cmd_show)

    p = sub.add_parser(
        "validate",
        help="gate + time an inference path at 512x512; on pass move alias champion here",
        description="Judge the path (backend x precision) by the precision gate on the test split "
        "(window PSNR/SSIM and max |diff| vs fp32, deploy.gate_* keys), time the passing paths at "
        "512x512 batch 1 (the gate figure; batched throughput reported beside it), and promote the "
        "fastest that meets the bar.",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model-version", "--version", dest="version", help="registry version number")
    which.add_argument("--alias", default=None, help="registry alias (default: candidate)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument(
        "--backend",
        default="torch",
        choices=["auto", *_backend_names()],
        help="inference runtime (default torch); auto = the fastest gated path of this device",
    )
    p.add_argument(
        "--precision",
        default=None,
        choices=["auto", "fp32", "bf16", "fp16", "int8"],
        help="default fp32 on CPU, fp16 on CUDA; auto = every precision this backend runs here",
    )
    p.add_argument(
        "--min-fps", type=float, help="bar (default 12.5 on CUDA, the paper's T4 figure; required on CPU)"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed runs per batch size (median)")
    p.add_argument(
        "--size",
        type=int,
        default=512,
        help="timed image size (default 512, the paper's; smaller only for smoke checks, and tagged)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override the model's own config, e.g. deploy.gate_max_abs_hu=3 (repeatable)",
    )
    p.add_argument(
        "--on-cluster",
        action="store_true",
        help="gate and time in a Ray task holding one GPU (a T4 worker), not on this (head) machine",
    )
    p.add_argument("--gpu-timeout", type=float, default=900.0, help="seconds to wait for a GPU worker")
    p.set_defaults(handler=_cmd_validate)

    p = sub.add_parser(
        "export", help="write model.onnx, model.pt, model.xml/.bin (OpenVINO) and model_card.json"
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model-version", "--version", dest="version", help="registry version number")
    which.add_argument("--alias", default=None, help="registry alias (default: champion)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="overwrite an existing export")
    p.set_defaults(handler=_cmd_export)

    p = sub.add_parser("denoise", help="denoise a DICOM series into a new DICOM series")
    p.add_argument("input", help="input DICOM directory (never modified)")
    p.add_argument("output", help="output directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="an export directory (from `ldct-best export`)")
    src.add_argument("--alias", help="registry alias to load instead (e.g. champion)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch", "openvino"])
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="openvino/torch precision (bf16 only where the CPU has it natively; default fp32)",
    )
    p.set_defaults(handler=_cmd_denoise)

    p = sub.add_parser(
        "migrate", help="re-register an old pickle-format version in the safe format (same aliases)"
    )
    p.add_argument("--model-version", "--version", dest="version", required=True, help="version number")
    p.set_defaults(handler=_cmd_migrate)

    return _run(parser, argv)


def _cmd_migrate(args: argparse.Namespace) -> int:
    from ldct import tracking

    new = tracking.migrate(args.version, args.tracking_uri)
    moved = ", ".join(sorted(new.aliases)) or "none"
    print(f"re-registered v{args.version} as v{new.version} (safetensors + pyfunc); aliases moved: {moved}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from ldct.tracking import list_versions

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


def _backend_names() -> list[str]:
    # Names only (no runtime imports): ldct.deploy.backends imports torch, which --help must not wait for.
    return ["torch", "onnxruntime", "openvino", "torch-cuda", "onnxruntime-cuda", "tensorrt"]


def _cmd_validate(args: argparse.Namespace) -> int:
    import torch

    from ldct import tracking
    from ldct.config import apply_overrides, from_flat
    from ldct.deploy.backends import BACKENDS, candidate_paths
    from ldct.deploy.throughput import default_min_fps
    from ldct.deploy.validate import validate_paths

    if args.on_cluster:
        from ldct.remote import RemoteError, connect

        try:
            connect()  # before loading anything: no cluster is a two-second answer, not a hang
        except RemoteError as exc:
            print(f"ldct-best validate: {exc}", file=sys.stderr)
            return 2
    backend = args.backend
    if args.on_cluster or (backend != "auto" and BACKENDS[backend].device_type == "cuda"):
        device = "cuda"
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if backend == "torch" and device == "cuda":
        backend = "torch-cuda"
    precision = args.precision or ("fp16" if device == "cuda" else "fp32")
    min_fps = args.min_fps if args.min_fps is not None else default_min_fps(device)
    if min_fps is None:
        print(
            f"ldct-best validate: give --min-fps for --device {device}: the paper's 12.5 FPS bar is a "
            f"T4 (CUDA) figure",
            file=sys.stderr,
        )
        return 2
    paths = candidate_paths(backend, precision, device)  # an impossible path fails here, loudly
    generator, meta = tracking.load_registered(
        alias=args.alias if args.version is None else None,
        version=args.version,
        tracking_uri=args.tracking_uri,
    )
    cfg = apply_overrides(from_flat(meta["config"]), args.overrides)
    print(
        f"validating ldct-denoiser v{meta['version']} on {device}: paths "
        f"{', '.join(f'{b} {p}' for b, p in paths)} (bar {min_fps:g} FPS at {args.size}x{args.size}, "
        "batch 1)..."
    )
    if args.on_cluster:
        from ldct.remote import RemoteError, validate_on_gpu_worker

        try:
            report = validate_on_gpu_worker(
                generator, cfg, paths, repeats=args.repeats, size=args.size, timeout_s=args.gpu_timeout
            )
        except RemoteError as exc:
            print(f"ldct-best validate: {exc}", file=sys.stderr)
            return 1
    else:
        report = validate_paths(generator, cfg, paths, repeats=args.repeats, size=args.size)
    chosen = report["chosen"]
    mlflow_client = tracking.client(args.tracking_uri)
    if chosen is None:
        refused = "; ".join(
            f"{r['backend']} {r['precision']}: {', '.join(r['gate']['failures'])}" for r in report["rows"]
        )
        mlflow_client.set_model_version_tag(
            tracking.MODEL_NAME,
            meta["version"],
            "fps_last_failed",
            f"precision gate refused {refused}"[:5000],
        )
        print(f"FAIL: no path passed the precision gate ({refused}); aliases unchanged", file=sys.stderr)
        return 1
    result = chosen["throughput"]
    label = f"{result['backend']} {result['precision']}"
    if result["fps"] >= min_fps:
        tracking.promote(meta["version"], result, min_fps, args.tracking_uri)  # fps_size from result
        _tag_path(mlflow_client, tracking.MODEL_NAME, meta["version"], chosen)
        print(
            f"PASS: {label} {result['fps']:.2f} FPS at batch 1 >= {min_fps:g} on {result['device_name']} "
            f"(batch {result['batched_batch']}: {result['batched_fps']:.2f} FPS); "
            f"alias 'champion' -> v{meta['version']}"
        )
        return 0
    tracking.record_failed_validation(meta["version"], result, min_fps, args.tracking_uri)
    print(
        f"FAIL: fastest gated path {label} {result['fps']:.2f} FPS at batch 1 < {min_fps:g} on "
        f"{result['device_name']} (batch {result['batched_batch']}: {result['batched_fps']:.2f} FPS); "
        "aliases unchanged",
        file=sys.stderr,
    )
    return 1


def _tag_path(mlflow_client, model_name: str, version: str, row: dict) -> None:
    """Beside tracking.promote's fps tags: backend, latency, batched figure and the gate's deltas."""
    result, verdict = row["throughput"], row["gate"]
    tags = {
        "fps_backend": result["backend"],
        "fps_latency_ms": f"{result['latency_ms']:.1f}",
        "fps_batched": f"{result['batched_fps']:.2f} at batch {result['batched_batch']}",
        "fps_gate": json.dumps({k: v for k, v in verdict.items() if k != "failures"}),
    }
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(model_name, str(version), key, value)


def _cmd_export(args: argparse.Namespace) -> int:
    from ldct import tracking
    from ldct.deploy.export import export_bundle

    alias = args.alias or (None if args.version else tracking.CHAMPION)
    generator, meta = tracking.load_registered(
        alias=alias, version=args.version, tracking_uri=args.tracking_uri
    )
    report = export_bundle(generator, meta, Path(args.out), force=args.force)
    print(
        f"exported ldct-denoiser v{meta['version']} to {args.out}: "
        f"{', '.join(sorted(report.get('files', [])))}; max error vs torch: onnxruntime "
        f"{report['parity_max_abs_hu']:.4f} HU, openvino {report['parity']['max_abs_hu_openvino']:.4f} HU"
    )
    return 0


def _cmd_denoise(args: argparse.Namespace) -> int:
    from ldct.deploy.denoise import denoise_series

    generator = meta = None
    if args.alias:
        from ldct import tracking

        generator, meta = tracking.load_registered(alias=args.alias, tracking_uri=args.tracking_uri)
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


# --------------------------------------------------------------------------- entry points


def _quiet_cpu_threads() -> None:
    # Before torch is imported (handlers import lazily): passive OpenMP waiting, see
    # ldct.train.cpu_thread_env for the measurement behind it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldct", description="Low-dose CT denoising study (ldct).")
    _add_global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="GROUP", required=True)
    _add_data_commands(sub)
    _add_train_command(sub)
    _add_eval_command(sub)
    _add_study_commands(sub)
    _add_report_command(sub)
    return parser


def _add_global_options(parser: argparse.ArgumentParser) -> None:
    from ldct import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error too (or set LDCT_DEBUG=1)"
    )


def debug_enabled() -> bool:
    """``--debug`` given (it sets LDCT_DEBUG) or LDCT_DEBUG set to anything but empty/0."""
    return os.environ.get("LDCT_DEBUG", "") not in ("", "0")


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    # `ldct study` hands everything after it to the study's own parser (ldct.study.main).
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        args.passthrough_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "debug", False):
        # Through the environment, so code below the CLI (ldct train's own error line) sees it too.
        os.environ["LDCT_DEBUG"] = "1"
    try:
        return int(args.handler(args) or EXIT_OK)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as exc:
        # Expected user errors (DicomError, ConfigError, TrackingError, missing cache...): one clear
        # line, no trace. Any other RuntimeError is a bug and keeps its traceback.
        if isinstance(exc, RuntimeError) and not type(exc).__module__.startswith("ldct"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        if debug_enabled():
            traceback.print_exc(file=sys.stderr)
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """``ldct`` console script."""
    _quiet_cpu_threads()
    return _run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
