"""``ldct-best validate``: gate and time each requested inference path, choose the fastest that passes.

For every (backend, precision) path: build its runner for the registered generator (exporting
ONNX / OpenVINO files into a temporary directory, quantising int8 on training slices), judge it
by the precision gate on the test panel against eager fp32 (:mod:`ldct.deploy.gate`), and time
the paths that pass at 512x512, batch 1 (the gate figure) and batched (reported beside it).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ldct.config import Config
from ldct.deploy import backends, gate
from ldct.deploy.throughput import measure_runner

ValidationInputs = tuple[gate.Panel, list[np.ndarray] | None]


def validation_inputs(cfg: Config, paths: Sequence[tuple[str, str]]) -> ValidationInputs:
    """What validation reads from the data: the gate's test panel, and training slices to
    calibrate int8 paths (None without one). Read where the data cache is: on a cluster, the head
    reads them and the GPU worker gets them with its task, so it needs no cache of its own."""
    calibration = gate.calibration_slices(cfg) if any(p == "int8" for _, p in paths) else None
    return gate.test_panel(cfg), calibration


def validate_paths(
    generator: nn.Module,
    cfg: Config,
    paths: Sequence[tuple[str, str]],
    repeats: int = 5,
    batch_sizes: Sequence[int] = (1, 4),
    size: int = 512,
    log: Callable[[str], None] = print,
    inputs: ValidationInputs | None = None,
) -> dict[str, Any]:
    """Gate and time ``paths``; returns ``{"rows": [...], "chosen": row | None, "panel": str}``.

    Each row: ``backend``, ``precision``, ``gate`` (the verdict), and for gated paths
    ``throughput`` (:func:`measure_runner`). ``chosen`` is the passing row with the highest
    batch-1 FPS. ``inputs``: :func:`validation_inputs` read elsewhere (default: read here).
    """
    norm = cfg.normalization
    panel, calibration = inputs if inputs is not None else validation_inputs(cfg, paths)
    log(f"precision gate on {panel.source}")
    reference = backends.TorchRunner.from_generator(generator, "fp32")
    reference_hu = gate.run_panel(reference, panel, norm)
    reference_scores = gate._window_scores(reference_hu, panel)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ldct-validate-") as tmp:
        for backend, precision in paths:
            runner = backends.runner_from_generator(
                generator, backend, precision, workdir=Path(tmp), calibration=calibration
            )
            outs = reference_hu if runner is reference else gate.run_panel(runner, panel, norm)
            verdict = gate.judge(outs, reference_hu, panel, cfg.deploy, reference_scores)
            log("  " + gate.format_verdict(runner.label, verdict))
            row: dict[str, Any] = {"backend": backend, "precision": precision, "gate": verdict}
            if verdict["passed"]:
                result = measure_runner(runner, size=size, batch_sizes=batch_sizes, repeats=repeats)
                row["throughput"] = result
                log(
                    f"  {runner.label}: batch 1 {result['fps']:.2f} FPS ({result['latency_ms']:.0f} ms), "
                    f"batch {result['batched_batch']} {result['batched_fps']:.2f} FPS"
                )
            rows.append(row)
            del runner
    passed = [r for r in rows if "throughput" in r]
    chosen = max(passed, key=lambda r: r["throughput"]["fps"]) if passed else None
    return {"rows": rows, "chosen": chosen, "panel": panel.source}
