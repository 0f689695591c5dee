"""``ldct data``: the built-in set, indexing a DICOM tree, simulating a dose, LDCT baselines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ldct.cli.common import EXIT_OK
from ldct.data.builtin import REAL_PATIENTS, write_builtin
from ldct.data.cache import baseline_table, build_cache
from ldct.data.simulate import ELECTRONIC_NOISE
from ldct.data.simulate_tree import simulate_tree
from ldct.metrics import METRIC_NAMES


def cmd_builtin(args: argparse.Namespace) -> int:
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


def cmd_index(args: argparse.Namespace) -> int:
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


def cmd_simulate(args: argparse.Namespace) -> int:
    report = simulate_tree(
        args.input,
        args.output,
        dose=args.dose,
        seed=args.seed,
        i0=args.i0,
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
    measured = [f["effective_dose"] for f in report["files"] if f.get("effective_dose") is not None]
    if measured:
        print(
            f"effective dose measured (var(full)/var(low) in soft tissue): median {sorted(measured)[len(measured) // 2]:.3f}, "
            f"range {min(measured):.3f}-{max(measured):.3f}; per slice in {Path(args.output) / 'ldct-simulate.json'}"
        )
    for _, note in report["notes"]:
        print(f"note: {note}")
    if report["skipped"]:
        print(f"skipped {len(report['skipped'])}:")
        for path, reason in report["skipped"]:
            print(f"  {path}: {reason}")
    print(f"index it with: ldct data index {args.output} --cache CACHE")
    return EXIT_OK


def _format_baseline(table: dict) -> str:
    cols = METRIC_NAMES
    head = f"{'patient':12s} {'slices':>6s} {'window':>11s} " + " ".join(f"{c:>12s}" for c in cols)
    lines = [
        f"LDCT vs full dose, split {table['split']!r}: *_body inside the body (reference > -500 HU, "
        "eroded 2 px) in each slice's anatomy window; *_window whole slice in [-160, 240] HU; "
        "*_full whole slice in [-1024, 3072] HU",
        head,
    ]

    def row(name: str, slices: int, window: str, m: dict) -> str:
        return f"{name:12s} {slices:6d} {window:>11s} " + " ".join(
            f"{m[c]:12.4f}" if c.startswith("ssim") else f"{m[c]:12.2f}" for c in cols
        )

    for r in table["patients"]:
        lo, hi = r["window"]
        lines.append(row(r["patient"], r["slices"], f"[{lo:g},{hi:g}]", r))
    lines.append(row("mean", table["mean"]["slices"], "", table["mean"]))
    return "\n".join(lines)


def cmd_baseline(args: argparse.Namespace) -> int:
    table = baseline_table(args.cache, split=args.split, window=args.window)
    print(json.dumps(table, indent=1) if args.json else _format_baseline(table))
    return EXIT_OK
