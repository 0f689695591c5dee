"""The confirmatory protocol: leave one real slice out (``ldct repeat --protocol loso``).

    ldct repeat --study quick --protocol loso --also paper-matched --realizations 4

Only five real CT slices exist offline (the built-in CTSMALL, ABDOMEN, HEAD693, SPINE, HEADJ2K),
and two of them (ABDOMEN, CTSMALL) were scored by every run before issue 22. So each real slice is
the test fold once (``data.test_patients = [slice]``): the fold's model trains on the phantoms and
the four other real slices, validates on the built-in phantom validation patient, and never sees
its test slice (``loso_train`` of each MLflow run lists what it trained on). No choice is made on a
real slice: the budget is the profile's ``train.iterations`` and the model scored is the LAST
checkpoint of every run (not the best-validation one), and ``--retune-lr`` chooses on the phantom
validation split only.

Each test slice is scored on K noise realizations: its quarter dose re-simulated K times from its
full dose by the calibrated simulator (``i0`` of the built-in set's calibration record, so the dose
is the effective dose), the same K for every arm, seed and baseline (paired). Per slice the metric
is averaged over realizations within a run, then over seeds; the interval is over slices (the
unit that varies in the population of anatomies): paired differences per slice, their mean and a
95 % Student-t interval with n - 1 degrees of freedom (``ldct.study.loso_report``).
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ldct.config import Config, from_flat, to_flat
from ldct.data.builtin import REAL_PATIENT_IDS, REAL_PATIENTS, read_builtin_marker, real_source
from ldct.data.dicom import read_hu
from ldct.data.manifest import body_parts, load_manifest, open_patient
from ldct.data.simulate import I0_FULL_DOSE, embed_in_body, simulate_low_dose
from ldct.errors import LdctError, TrainingError
from ldct.evaluation.baselines import BM3DCache, EstimatedSigmaBM3D
from ldct.evaluation.denoisers import torch_denoiser
from ldct.metrics import all_metrics, resolve_window
from ldct.study import scaffold
from ldct.study.arms import TUNED_ARM, build_arms, with_lrs
from ldct.study.endpoints import REFERENCES, check_endpoints
from ldct.study.repeat import arm_params, open_repeat, repeat_runs, retune_lrs
from ldct.study.trial import run_trial
from ldct.tracking.runs import checkpoint_uri, log_params, log_test_table
from ldct.training.checkpoint import CHECKPOINT_FILE, generator_from_state, load_state
from ldct.training.loop import VAL_METRIC, prepare_data

PROTOCOLS = ("seeds", "loso")
DEFAULT_REALIZATIONS = 4
FOLD_KEY = "loso_fold"
# How each real slice was used before issue 22 (the report prints it beside the slice's numbers).
LOOKED_AT = {
    "ABDOMEN": "test panel of every run and report before issue 22 (scored many times)",
    "CTSMALL": "test panel of every run and report before issue 22 (scored many times)",
    "HEAD693": "validation slice before issue 22: hyperparameters, checkpoints and baseline σ chosen on it",
    "SPINE": "training slice before issue 22 (never scored)",
    "HEADJ2K": "training slice before issue 22 (never scored)",
}


class LosoError(LdctError, ValueError):
    """A LOSO repeat asked of data without real built-in slices, of unknown folds, or with a real
    slice in the validation split."""


@dataclasses.dataclass
class LosoResult:
    name: str
    tracking_uri: str
    parent_run_id: str
    folds: list[str]
    seeds: list[int]
    realizations: int
    dose: float
    arms: dict[str, dict[str, Any]]  # arm -> the flat values it trained with
    references: list[str]  # the baselines scored: ldct, and bm3d unless --no-bm3d
    slices: dict[str, dict[str, Any]]  # fold -> calibration, body part, window, looked_at
    rows: list[dict[str, Any]]  # per (fold, method, seed, realization): metrics
    runs: list[dict[str, Any]]  # per run: run_id, arm, fold, seed, status, train patients
    retune: dict[str, Any] | None
    wall_seconds: float


def fold_names(patients: Sequence[str], wanted: str | Sequence[str] | None = None) -> list[str]:
    """The real built-in slices of a cache (all folds) or the ``--folds A,B`` subset of them."""
    real = [p for p in REAL_PATIENT_IDS if p in set(patients)]
    if not real:
        raise LosoError(
            "--protocol loso needs the built-in set's real slices "
            f"({', '.join(REAL_PATIENT_IDS)}); this data has none (leave data.root empty)"
        )
    if wanted is None or wanted == "":
        return real
    names = [w.strip() for w in (wanted.split(",") if isinstance(wanted, str) else wanted) if w.strip()]
    unknown = [n for n in names if n not in real]
    if unknown or not names:
        raise LosoError(
            f"--folds {','.join(names) or repr(wanted)}: unknown slice(s) {unknown}; choose from {', '.join(real)}"
        )
    return [p for p in real if p in names]


def check_validation(splits: dict[str, list[str]]) -> list[str]:
    """The validation patients, refused if any is a real slice (every real slice is a test fold)."""
    val = list(splits.get("val", []))
    real_val = sorted(set(val) & set(REAL_PATIENTS))
    if real_val:
        raise LosoError(
            f"validation patients {real_val} are real slices: no choice may be made on a real slice's "
            "metrics under --protocol loso; validate on a phantom (e.g. --set data.val_patients=PH01)"
        )
    return val


def fold_splits(splits: dict[str, list[str]], fold: str) -> dict[str, list[str]]:
    """The fold's splits: test = [fold], validation = the default one (phantoms), train = the rest."""
    val = check_validation(splits)
    everyone = sorted({p for group in splits.values() for p in group})
    return {"train": [p for p in everyone if p not in val and p != fold], "val": val, "test": [fold]}


def _fold_value(by_fold: dict[str, dict[str, Any]], key: str, spec: Any) -> Any:
    return by_fold[spec.config[FOLD_KEY]][key]


def run_fold_trial(
    config: dict[str, Any], base: dict[str, Any], cache_dir: str, splits: dict[str, list[str]], storage: str
) -> None:
    """One LOSO trial: :func:`ldct.study.trial.run_trial` on the splits its own config names (the
    strings logged as its params), never the study's default ``splits``."""
    mine = {k: [p for p in str(config[f"loso_{k}"]).split(",") if p] for k in ("train", "val", "test")}
    run_trial(config, base, cache_dir, mine, storage)


def slice_info(cache_dir: Path, folds: Sequence[str], window: str = "auto") -> dict[str, dict[str, Any]]:
    """Per test slice: the built-in set's calibration record (H1: native σ, i0, effective dose,
    pixel size), its body part and metric window (``data.window``: "auto" = by body part, as the
    validation in training), and how it was used before issue 22."""
    manifest = load_manifest(cache_dir)
    calibration = (read_builtin_marker(manifest.root) or {}).get("calibration", {})
    parts = body_parts(cache_dir, folds)
    info = {}
    for fold in folds:
        record = dict(calibration.get(fold) or {})
        if "pixel_size_mm" not in record:
            record["pixel_size_mm"] = float(np.mean(read_hu(real_source(fold))[1]["spacing"]))
        info[fold] = {
            "calibrated": "i0" in record,
            "native_sigma_hu": record.get("native_sigma_hu"),
            "i0": float(record.get("i0", I0_FULL_DOSE)),
            "effective_dose": record.get("effective_dose"),
            "pixel_size_mm": float(record["pixel_size_mm"]),
            "body_part": parts.get(fold, ""),
            "window": list(resolve_window(window, parts.get(fold) or None)),
            "looked_at": LOOKED_AT.get(fold, "unknown"),
        }
    return info


def realizations(
    full: np.ndarray, patient: str, info: dict[str, Any], dose: float, k: int, seed: int
) -> list[np.ndarray]:
    """K quarter-dose realizations of one real slice from its full dose (the calibrated simulator;
    a crop is embedded in a body outline as the built-in set does), deterministic per (seed, slice, k)."""
    out = []
    spacing = info["pixel_size_mm"]
    tag = REAL_PATIENT_IDS.index(patient)
    for r in range(k):
        rng = np.random.default_rng([seed, 0x1050, tag, r])
        if REAL_PATIENTS[patient][1]:
            canvas, where = embed_in_body(full, spacing)
            out.append(simulate_low_dose(canvas, dose, rng, i0=info["i0"], pixel_size_mm=spacing)[where])
        else:
            out.append(simulate_low_dose(full, dose, rng, i0=info["i0"], pixel_size_mm=spacing))
    return out


def bm3d_estimated(
    hu: np.ndarray, pixel_size_mm: float, bm3d: EstimatedSigmaBM3D
) -> tuple[np.ndarray, float]:
    """BM3D with ``sigma_psd`` estimated from the input itself (no tuning on any split): the output
    and the σ used (``ldct.evaluation.baselines.EstimatedSigmaBM3D``)."""
    out = bm3d(hu, pixel_size_mm)
    return out, float(bm3d.last["sigma_psd"])


def last_state(result: Any, storage: str) -> dict[str, Any]:
    """The LAST checkpoint a Tune trial reported (Ray Train always keeps the latest), loaded weights-only."""
    from ray.train import Checkpoint

    path = (result.metrics or {}).get("checkpoint_path")
    if not path:
        raise TrainingError(
            f"trial {result.config.get(FOLD_KEY)}/{result.config.get('repeat_arm')} reported no checkpoint"
        )
    with tempfile.TemporaryDirectory(prefix="ldct-loso-") as tmp:
        Checkpoint(checkpoint_uri(path, storage)).to_directory(tmp)
        return load_state(Path(tmp) / CHECKPOINT_FILE)


def score_image(pred: np.ndarray, full: np.ndarray, window: Sequence[float]) -> dict[str, float]:
    """Every metric of one output against the full dose, the body metrics in the slice's window."""
    return {k: float(v[0]) for k, v in all_metrics(pred, full, window=tuple(window)).items()}


def run_loso(
    cfg: Config,
    source_label: str,
    source: dict[str, Any],
    *,
    folds: str | Sequence[str] | None = None,
    seeds: int = 1,
    realizations_per_slice: int = DEFAULT_REALIZATIONS,
    also: Sequence[str] = (),
    retune_lr: bool = False,
    redcnn_source: dict[str, Any] | None = None,
    bm3d: bool = True,
    tracking_uri: str | None = None,
    storage: str | None = None,
) -> LosoResult:
    """Train every (fold, arm, seed) as one Ray Tune grid, then score each run's last checkpoint
    on K realizations of its test slice beside the LDCT input and BM3D (σ estimated)."""
    from ray import tune

    if seeds < 1 or realizations_per_slice < 1:
        raise LosoError(f"--seeds and --realizations must be >= 1, got {seeds} and {realizations_per_slice}")
    started = time.perf_counter()
    name = f"repeat-{source_label}-loso"
    arms = build_arms(cfg, source, also, redcnn_source)
    references = list(REFERENCES if bm3d else [r for r in REFERENCES if r != "bm3d"])
    check_endpoints(cfg, list(arms), references)  # before any training: the endpoints are fixed in advance
    base_flat = {**to_flat(cfg), "study.name": name}
    for values in arms.values():
        from_flat({**base_flat, **values})  # every arm's values checked before any work
    base = from_flat({**base_flat, **arms[TUNED_ARM]})
    seed_list = [int(cfg.train.seed) + i for i in range(seeds)]
    # Folds and splits checked before Ray starts or a parent run opens (prepare_data is idempotent).
    _, splits = prepare_data(base)
    chosen_folds = fold_names(sorted({p for group in splits.values() for p in group}), folds)
    by_fold = {f: fold_splits(splits, f) for f in chosen_folds}

    outputs = scaffold.resolve_outputs(cfg, tracking_uri, storage)
    opened = open_repeat(base, name, outputs, "repeat-loso", source_label)
    info = slice_info(opened.cache_dir, chosen_folds, cfg.data.window)
    mlflow_client, parent = opened.mlflow_client, opened.parent_run_id
    log_params(
        mlflow_client,
        parent,
        {
            "repeat.protocol": "loso",
            "repeat.folds": ",".join(chosen_folds),
            "repeat.seeds": seeds,
            "repeat.realizations": realizations_per_slice,
            "repeat.arms": ",".join(arms),
            "repeat.retune_lr": retune_lr,
            "repeat.checkpoint": "last",
        },
    )
    fold_keys = ("data.test_patients", "loso_train", "loso_val", "loso_test")
    varied = {k for values in arms.values() for k in values} | {"train.seed", *fold_keys}
    callback = scaffold.study_callback(name, outputs, opened, varied)
    retune = None
    if retune_lr:
        # On phantoms alone (training and validation): a real slice in the training data of the
        # runs that choose an lr would be a test fold reaching a choice made for it.
        phantoms = {
            split: [p for p in patients if p not in REAL_PATIENTS] for split, patients in splits.items()
        }
        retune = retune_lrs(
            cfg, name, outputs, dataclasses.replace(opened, splits=phantoms), arms, callback,
            seed_list[0], scaffold.trainable(cfg, outputs, dataclasses.replace(opened, splits=phantoms)),
        )  # fmt: skip
        retune["train_patients"] = phantoms["train"]
        arms = with_lrs(arms, retune["chosen"])
    fold_values = {
        f: {
            "data.test_patients": [f],
            **{f"loso_{k}": ",".join(v) for k, v in s.items()},
        }
        for f, s in by_fold.items()
    }
    param_space: dict[str, Any] = {
        **arm_params(tune, arms),
        **{k: tune.sample_from(functools.partial(_fold_value, fold_values, k)) for k in fold_keys},
        FOLD_KEY: tune.grid_search(chosen_folds),
        "repeat_arm": tune.grid_search(list(arms)),
        "train.seed": tune.grid_search(seed_list),
    }
    tuner = tune.Tuner(
        scaffold.trainable(cfg, outputs, opened, run_fold_trial),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=VAL_METRIC, mode="max", num_samples=1, max_concurrent_trials=cfg.study.max_concurrent
        ),
        run_config=scaffold.run_config(name, outputs, callback),
    )
    try:
        return _train_and_score(
            tuner, opened, outputs, by_fold, info, arms, realizations_per_slice, seed_list, cfg, bm3d,
            name, references, retune, started,
        )  # fmt: skip
    except BaseException:
        # A crash after hours of training must not leave the parent looking like a running repeat.
        mlflow_client.set_terminated(parent, status="FAILED")
        raise


def _train_and_score(
    tuner: Any,
    opened: scaffold.Opened,
    outputs: scaffold.Outputs,
    by_fold: dict[str, dict[str, list[str]]],
    info: dict[str, dict[str, Any]],
    arms: dict[str, dict[str, Any]],
    realizations_per_slice: int,
    seed_list: list[int],
    cfg: Config,
    bm3d: bool,
    name: str,
    references: list[str],
    retune: dict[str, Any] | None,
    started: float,
) -> LosoResult:
    mlflow_client, parent = opened.mlflow_client, opened.parent_run_id
    chosen_folds = list(by_fold)
    grid = tuner.fit()
    last = {
        (r.config[FOLD_KEY], r.config["repeat_arm"], int(r.config["train.seed"])): r
        for r in grid
        if r.error is None
    }
    rows, runs = _score(
        opened, outputs, by_fold, info, last, list(arms), realizations_per_slice, seed_list, cfg, bm3d
    )
    by_run = {(r["fold"], r["arm"], r["seed"]): r for r in runs}
    for run in repeat_runs(mlflow_client, name, parent):
        key = (
            run.data.params.get(FOLD_KEY),
            run.data.params.get("repeat_arm"),
            int(run.data.params["train.seed"]),
        )
        if key in by_run:
            by_run[key]["run_id"] = run.info.run_id
            if by_run[key]["status"] != "failed":  # scoring failed: the training's status would hide it
                by_run[key]["status"] = run.data.tags.get("ldct.status", "unknown")
            if by_run[key]["test"]:
                log_test_table(mlflow_client, run.info.run_id, {"denoised": by_run[key]["test"]})
                # The run's checkpoint artifact is its best-validation one; the scores are the last's.
                mlflow_client.set_tag(
                    run.info.run_id, "ldct.scored_checkpoint", f"last (step {by_run[key]['step']})"
                )
    wall = time.perf_counter() - started
    mlflow_client.log_metric(parent, "repeat_wall_seconds", wall)
    mlflow_client.set_terminated(parent, status="FINISHED")
    return LosoResult(
        name, outputs.tracking_uri, parent, chosen_folds, seed_list, realizations_per_slice,
        float(cfg.data.builtin_dose), arms, references, info, rows, runs, retune, wall,
    )  # fmt: skip


def _score(
    opened: scaffold.Opened,
    outputs: scaffold.Outputs,
    by_fold: dict[str, dict[str, list[str]]],
    info: dict[str, dict[str, Any]],
    last: dict[tuple[str, str, int], Any],
    arms: list[str],
    k: int,
    seeds: list[int],
    cfg: Config,
    with_bm3d: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every fold: K realizations; the LDCT input, BM3D (σ estimated) and every completed run's last
    checkpoint on each. Rows: one per (fold, method, seed, realization); runs: one per trained run."""
    bm3d = EstimatedSigmaBM3D(BM3DCache())
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for fold in by_fold:
        _, full_cached = open_patient(opened.cache_dir, fold)
        full = np.asarray(full_cached[0], dtype=np.float32)
        lows = realizations(
            full, fold, info[fold], float(cfg.data.builtin_dose), k, int(cfg.data.builtin_seed)
        )
        window = info[fold]["window"]
        for r, low in enumerate(lows):
            rows.append(
                {
                    "fold": fold,
                    "method": "ldct",
                    "seed": None,
                    "realization": r,
                    "metrics": score_image(low, full, window),
                }
            )
            if not with_bm3d:
                continue
            out, sigma = bm3d_estimated(low, info[fold]["pixel_size_mm"], bm3d)
            rows.append(
                {"fold": fold, "method": "bm3d", "seed": None, "realization": r, "sigma_psd": sigma,
                 "metrics": score_image(out, full, window)}
            )  # fmt: skip
        for (f, arm, seed), result in sorted(last.items()):
            if f != fold:
                continue
            try:
                state = last_state(result, outputs.storage)
                generator, run_cfg = generator_from_state(state)
                denoise = torch_denoiser(generator, run_cfg.normalization, "cpu")
                per_r = [
                    score_image(np.asarray(denoise(low), dtype=np.float32), full, window) for low in lows
                ]
            except Exception as exc:  # noqa: BLE001 - one unreadable run must not lose the others' scores
                print(f"[ldct] scoring {fold}/{arm}/seed {seed} failed: {exc}", flush=True)
                runs.append(
                    {"run_id": None, "arm": arm, "fold": fold, "seed": seed, "status": "failed",
                     "error": f"scoring: {exc}", "test": None}
                )  # fmt: skip
                continue
            for r, values in enumerate(per_r):
                rows.append({"fold": fold, "method": arm, "seed": seed, "realization": r, "metrics": values})
            runs.append(
                {
                    "run_id": None, "arm": arm, "fold": fold, "seed": seed, "status": "completed",
                    "step": int(state.get("step", 0)), "train_patients": by_fold[fold]["train"],
                    "test": {m: float(np.mean([v[m] for v in per_r])) for m in per_r[0]},
                }
            )  # fmt: skip
    for fold in by_fold:
        for arm in arms:
            for seed in seeds:
                if (fold, arm, seed) not in last:  # its training failed
                    runs.append(
                        {
                            "run_id": None,
                            "arm": arm,
                            "fold": fold,
                            "seed": seed,
                            "status": "failed",
                            "test": None,
                        }
                    )
    return rows, runs
