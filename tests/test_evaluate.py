"""`ldct eval` / ldct.evaluation on the smoke profile's real cache: rows, scikit-image parity, BM3D."""

from __future__ import annotations

import json
import math

import numpy as np
import pydicom
import pytest
from conftest import write_mayo_tree
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ldct.cli import main
from ldct.config import load_config
from ldct.data.cache import baseline_table, build_cache, ensure_data, load_manifest
from ldct.evaluation import baselines as eval_baselines
from ldct.evaluation import denoisers as eval_denoisers
from ldct.evaluation import slices as eval_slices
from ldct.evaluation import tables as eval_tables
from ldct.metrics import FULL_RANGE, METRIC_NAMES, WINDOW_RANGE, body_mask, psnr_window, window_for
from ldct.registry import load as registry_load
from ldct.training.loop import run_local


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke profile's built-in cache (in the session's temporary LDCT_HOME, with its BM3D
    cache: the first `ldct eval` here fills it for the studies after) and a 2-step checkpoint."""
    cfg = load_config("smoke", ["train.iterations=2"])
    cache, splits = ensure_data(cfg.data)
    session = run_local(cfg, checkpoint_root=tmp_path_factory.mktemp("ckpt"))
    return {"cfg": cfg, "cache": cache, "splits": splits, "checkpoint": session.checkpoints[-1]}


@pytest.fixture(scope="module")
def table(smoke):
    """`ldct eval --data CACHE --split test --checkpoint DIR --json`, parsed."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(
            [
                "eval",
                "--data",
                str(smoke["cache"]),
                "--split",
                "test",
                "--checkpoint",
                str(smoke["checkpoint"]),
            ]
            + ["--json", "--quiet"]
        )
    assert rc == 0
    return json.loads(out.getvalue())


def test_every_row_present_and_finite(table, smoke):
    assert table["rows"] == ["ldct", "gaussian", "bm3d", "bm3d_est", "model"]
    test_patients = load_manifest(smoke["cache"]).splits["test"]
    assert table["patients"] == test_patients
    assert len(table["slices"]) >= 1
    for s in table["slices"]:
        assert set(s["metrics"]) == set(table["rows"])
        for row in s["metrics"].values():
            assert set(row) == set(METRIC_NAMES)
        assert math.isfinite(s["noise_std_hu"]) and s["noise_std_hu"] > 1.0
        # Each slice says which window its body metrics are in, and the σ BM3D was given.
        assert tuple(s["window"]) == window_for(s["body_part"])
        assert s["bm3d_estimated"]["sigma_psd"] > 0 and s["bm3d_estimated"]["estimator"]
    assert eval_tables.table_is_finite(table)
    for key in table["rows"]:
        assert all(math.isfinite(v) for v in table["mean"][key].values())
        assert all(math.isfinite(v) and v >= 0 for v in table["std"][key].values())
    # The budget is stated and the choices come from their grids, tuned on val, not on test.
    for method in ("gaussian", "bm3d"):
        tuned = table["tuning"][method]
        assert tuned["chosen"] in tuned["candidates"] and tuned["criterion"] == "psnr_body"
        assert len(tuned["val_psnr_body"]) == len(tuned["val_psnr_window"]) == len(tuned["candidates"])
        assert tuned["chosen"] == tuned["candidates"][int(np.argmax(tuned["val_psnr_body"]))]
        assert isinstance(tuned["at_grid_edge"], bool) and set(tuned["extended"]) <= set(tuned["candidates"])
        assert tuned["val_slices"] >= 1
    assert table["tuning"]["patients"] == load_manifest(smoke["cache"]).splits["val"]
    assert not set(table["tuning"]["patients"]) & set(test_patients)
    assert "warning" not in table["tuning"]


def test_ldct_row_equals_scikit_image_from_the_cache(table, smoke):
    manifest = load_manifest(smoke["cache"])
    for s in table["slices"]:
        arrays = manifest.patients[s["patient"]]["arrays"]
        low = np.load(smoke["cache"] / arrays["low"])[s["index"]].astype(np.float64)
        full = np.load(smoke["cache"] / arrays["full"])[s["index"]].astype(np.float64)
        row = s["metrics"]["ldct"]
        for name, (lo, hi) in (("window", WINDOW_RANGE), ("full", FULL_RANGE)):
            p, t = np.clip(low, lo, hi), np.clip(full, lo, hi)
            assert row[f"psnr_{name}"] == pytest.approx(
                peak_signal_noise_ratio(t, p, data_range=hi - lo), abs=1e-6
            )
            expected = structural_similarity(
                t, p, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=hi - lo
            )
            assert row[f"ssim_{name}"] == pytest.approx(expected, abs=1e-4)
        assert row["rmse_hu"] == pytest.approx(np.sqrt(np.mean((low - full) ** 2)), rel=1e-6)
        # The body metrics: the same formulas over the full dose's body mask, in the slice's window.
        mask = body_mask(full)
        lo, hi = s["window"]
        err = (np.clip(low, lo, hi) - np.clip(full, lo, hi))[mask]
        assert row["psnr_body"] == pytest.approx(10 * np.log10((hi - lo) ** 2 / np.mean(err**2)), abs=1e-6)
        assert row["rmse_body_hu"] == pytest.approx(np.sqrt(np.mean((low - full)[mask] ** 2)), rel=1e-6)


def test_text_and_markdown_show_every_row_and_the_budget(table):
    text = eval_tables.format_eval(table)
    for label in table["labels"].values():
        assert label in text
    assert "noise std" in text and "mean ± std over" in text
    for method in ("gaussian", "bm3d"):
        assert f"{len(table['tuning'][method]['candidates'])} candidates" in text
    assert "tuned on the val split by mean psnr_body" in text and "BM3D (σ estimated): sigma_psd" in text
    assert text.index("psnr_body") < text.index("psnr_window")  # the body metrics lead
    md = eval_tables.markdown_eval(table)
    assert md.count("| BM3D") == 2 * (1 + len(table["slices"]))  # σ tuned and σ estimated rows
    # The legacy mean-rows shape (ldct train --json, report summary) carries the BM3D row too.
    rows = eval_tables.mean_rows(table)
    assert list(rows) == ["ldct", "classical", "bm3d", "bm3d_est", "denoised"]
    assert rows["bm3d"]["sigma_psd"] == table["tuning"]["bm3d"]["chosen"]
    assert "BM3D" in eval_tables.format_table(rows)


def test_mean_and_std_are_over_slices(smoke):
    # The train split has several slices: mean and (sample) std must be numpy's over them.
    train = smoke["splits"]["train"][:2]
    result = eval_tables.evaluate_split(
        smoke["cache"], train, smoke["splits"]["val"], split="train", bm3d=False
    )
    values = np.array([s["metrics"]["ldct"]["psnr_window"] for s in result["slices"]])
    assert len(values) >= 2
    assert result["mean"]["ldct"]["psnr_window"] == pytest.approx(values.mean())
    assert result["std"]["ldct"]["psnr_window"] == pytest.approx(values.std(ddof=1))


def test_bm3d_beats_ldct_on_a_slice_made_noisy_on_purpose(smoke):
    manifest = load_manifest(smoke["cache"])
    patient = manifest.splits["test"][0]
    full = np.load(smoke["cache"] / manifest.patients[patient]["arrays"]["full"])[0].astype(np.float32)
    full = full[16:112, 16:112]  # 96x96 of real anatomy: BM3D is slow
    rng = np.random.default_rng(0)
    noisy = full + rng.normal(0.0, 40.0, full.shape).astype(np.float32)
    # sigma_psd from another noise draw (a validation stand-in), never from the scored image.
    other = eval_slices.SlicePair("val", 0, full + rng.normal(0.0, 40.0, full.shape).astype(np.float32), full)
    tuned = eval_baselines.tune_parameter(eval_baselines.bm3d_denoise, [other], (20.0, 40.0, 80.0), "bm3d")
    before = float(psnr_window(noisy, full)[0])
    after = float(psnr_window(eval_baselines.bm3d_denoise(noisy, tuned["chosen"]), full)[0])
    assert after > before + 2.0, (before, after, tuned)


def test_model_sources_are_checked():
    with pytest.raises(ValueError, match="exactly one model source"):
        registry_load.load_denoiser()
    with pytest.raises(ValueError, match="exactly one model source"):
        registry_load.load_denoiser(version="1", checkpoint="x")
    assert registry_load.parse_model_uri("models:/ldct-denoiser@champion") == ("champion", None)
    assert registry_load.parse_model_uri("models:/ldct-denoiser/3") == (None, "3")
    with pytest.raises(ValueError, match="models:/ldct-denoiser@ALIAS"):
        registry_load.parse_model_uri("models:/other@champion")


def test_eval_names_a_missing_cache(tmp_path, capsys):
    assert main(["eval", "--data", str(tmp_path / "nope"), "--no-bm3d"]) == 1
    err = capsys.readouterr().err
    assert "nope" in err and "ldct data index" in err and "Traceback" not in err


def test_moved_names_stay_importable_from_their_old_modules():
    from ldct.evaluation.baselines import gaussian_denoise, tune_gaussian_sigma
    from ldct.evaluation.tables import format_table, score_test_split

    assert gaussian_denoise is eval_baselines.gaussian_denoise
    assert tune_gaussian_sigma is eval_baselines.tune_gaussian_sigma
    assert score_test_split is eval_tables.score_test_split and format_table is eval_tables.format_table


def test_onnx_export_scores_like_its_checkpoint(smoke, tmp_path):
    from ldct.deploy.export import export_bundle
    from ldct.training.checkpoint import generator_from_state, load_state

    state = load_state(smoke["checkpoint"])
    generator, cfg = generator_from_state(state)
    export_bundle(
        generator, {"config": state["config"], "normalization": state["normalization"]}, tmp_path / "x"
    )
    onnx, label = registry_load.load_denoiser(onnx=tmp_path / "x")
    assert label.startswith("ONNX")
    torch_run = eval_denoisers.torch_denoiser(generator, cfg.normalization)
    common = {"split": "test", "bm3d": False}
    splits = smoke["splits"]
    by_onnx = eval_tables.evaluate_split(
        smoke["cache"], splits["test"], splits["val"], denoiser=onnx, **common
    )
    by_torch = eval_tables.evaluate_split(
        smoke["cache"], splits["test"], splits["val"], denoiser=torch_run, **common
    )
    for metric in METRIC_NAMES:
        assert by_onnx["mean"]["model"][metric] == pytest.approx(by_torch["mean"]["model"][metric], rel=1e-4)


def test_bm3d_cache_returns_the_same_output_and_recomputes_what_it_cannot_trust(smoke, tmp_path, capsys):
    manifest = load_manifest(smoke["cache"])
    patient = manifest.splits["test"][0]
    low = np.load(smoke["cache"] / manifest.patients[patient]["arrays"]["low"])[0][32:96, 32:96]
    low = np.ascontiguousarray(low, dtype=np.float32)
    cache = eval_baselines.BM3DCache(tmp_path / "bm3d")
    first = cache(low, 30.0)
    # bm3d itself is not bit-reproducible: float32 FFTs differ between calls by ~1e-7 relative
    # alone and up to 0.025 HU (2.7e-5) under load. 0.1 HU is far below the ~30 HU noise.
    np.testing.assert_allclose(first, eval_baselines.bm3d_denoise(low, 30.0), rtol=0, atol=0.1)
    again = cache(low, 30.0)
    assert (cache.hits, cache.misses) == (1, 1)
    np.testing.assert_array_equal(again, first)
    # Another sigma or one changed pixel is another entry, never the stored output.
    cache(low, 31.0)
    changed = low.copy()
    changed[0, 0] += 1.0
    cache(changed, 30.0)
    assert (cache.hits, cache.misses) == (1, 3) and len(list((tmp_path / "bm3d").glob("*.npy"))) == 3
    # A truncated entry is recomputed (and rewritten), not trusted.
    entry = next(p for p in (tmp_path / "bm3d").glob("*.npy") if np.array_equal(np.load(p), first))
    entry.write_bytes(entry.read_bytes()[:100])
    redone = cache(low, 30.0)
    np.testing.assert_allclose(redone, first, rtol=1e-5, atol=1e-3)
    assert cache.misses == 4 and np.array_equal(np.load(entry, allow_pickle=False), redone)
    # A directory that cannot be written costs the recomputation and one warning, not the result.
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    readonly = eval_baselines.BM3DCache(blocked / "bm3d")
    np.testing.assert_allclose(readonly(low, 30.0), first, rtol=1e-5, atol=1e-3)
    readonly(low, 30.0)
    assert readonly.misses == 2 and capsys.readouterr().err.count("not writable") == 1


def test_eval_reads_bm3d_from_its_cache_the_second_time_and_says_so(smoke, tmp_path):
    splits = smoke["splits"]
    test = ["CTSMALL"] if "CTSMALL" in splits["test"] else splits["test"][:1]  # 128²: BM3D in ~1 s
    common = {"split": "test", "tune_crop": 48, "bm3d_sigmas": (20.0, 40.0)}
    first = eval_tables.evaluate_split(
        smoke["cache"], test, splits["val"], bm3d=eval_baselines.BM3DCache(tmp_path), **common
    )
    cache = eval_baselines.BM3DCache(tmp_path)
    second = eval_tables.evaluate_split(smoke["cache"], test, splits["val"], bm3d=cache, **common)
    assert (
        second["slices"] == first["slices"]
        and second["tuning"]["bm3d"]["chosen"] == first["tuning"]["bm3d"]["chosen"]
    )
    n_tune = len(second["tuning"]["bm3d"]["candidates"]) * second["tuning"]["bm3d"]["val_slices"]
    assert first["tuning"]["bm3d"]["cached"] == 0 and second["tuning"]["bm3d"]["cached"] == n_tune
    # Every test slice twice: BM3D at the tuned σ and at its own estimated σ.
    assert second["bm3d_cache"]["misses"] == 0 and second["bm3d_cache"]["hits"] == n_tune + 2 * len(
        second["slices"]
    )
    assert f"{n_tune} of {n_tune} from the BM3D cache" in "\n".join(eval_tables.budget_lines(second))


def _bump(hu: np.ndarray, v: float, best: float, ref: np.ndarray) -> np.ndarray:
    """A stand-in method whose output is best at parameter ``best``: ref + its noise x |v-best|/best."""
    return ref + (hu - ref) * abs(v - best) / best


def test_a_choice_on_the_grid_edge_extends_the_grid_or_is_flagged():
    rng = np.random.default_rng(0)
    ref = np.where(np.hypot(*np.mgrid[-20:20, -20:20]) < 15, 40.0, -1000.0)
    pairs = [eval_slices.SlicePair("val", 0, ref + rng.normal(0, 20, ref.shape), ref)]

    def tune(best, grid, **kw):
        return eval_baselines.tune_parameter(lambda hu, v: _bump(hu, v, best, ref), pairs, grid, "x", **kw)

    inside = tune(2.0, (1.0, 2.0, 3.0))
    assert inside["chosen"] == 2.0 and inside["extended"] == [] and not inside["at_grid_edge"]
    # Upper edge: the grid goes on geometrically (x1.5 here) until the best is inside it.
    up = tune(7.0, (1.0, 2.0, 3.0))
    assert up["extended"] == pytest.approx([4.5, 6.75, 10.125]) and up["chosen"] == 6.75
    assert up["candidates"] == pytest.approx([1.0, 2.0, 3.0, 4.5, 6.75, 10.125]) and not up["at_grid_edge"]
    # Still on the edge after EXTEND_STEPS: flagged, and the table's label says so.
    far = tune(1000.0, (1.0, 2.0, 3.0))
    assert len(far["extended"]) == eval_baselines.EXTEND_STEPS and far["at_grid_edge"]
    low = tune(0.3, (10.0, 20.0), extend_steps=2)
    assert low["candidates"] == [2.5, 5.0, 10.0, 20.0] and low["chosen"] == 2.5 and low["at_grid_edge"]
    # 0 is the Gaussian's true end (the input itself): never extended below, never flagged.
    zero = eval_baselines.tune_parameter(eval_baselines.gaussian_denoise, pairs, (0.0, 0.5), "g")
    assert zero["candidates"][0] == 0.0 and not (zero["chosen"] == 0.0 and zero["at_grid_edge"])
    with pytest.raises(ValueError, match="ascending"):
        tune(2.0, (3.0, 1.0))


def test_body_part_from_the_dicom_picks_each_slices_window(tmp_path):
    files = write_mayo_tree(tmp_path / "tree", {"A1": 1, "B1": 1, "C1": 1}, size=32)
    for low, full in files["B1"].values():
        for path in (low, full):
            ds = pydicom.dcmread(path)
            ds.BodyPartExamined = "HEAD"
            ds.save_as(path)
    cache = tmp_path / "cache"
    manifest = build_cache(tmp_path / "tree", cache, val=["A1"], test=["B1", "C1"], progress=False)
    assert {p: e["body_part"] for p, e in manifest.patients.items()} == {"A1": "", "B1": "HEAD", "C1": ""}
    table = baseline_table(cache, "test")
    windows = {r["patient"]: tuple(r["window"]) for r in table["patients"]}
    assert windows == {"B1": (0.0, 80.0), "C1": (-160.0, 240.0)}
    assert list(table["mean"])[1:4] == ["psnr_body", "ssim_body", "rmse_body_hu"]
    # The same noise scored in an 80 HU window instead of 400: 20 log10(5) = 14 dB lower.
    by = {r["patient"]: r for r in table["patients"]}
    assert by["C1"]["psnr_body"] - by["B1"]["psnr_body"] == pytest.approx(13.98, abs=1.5)
    forced = baseline_table(cache, "test", window="soft_tissue")
    assert all(tuple(r["window"]) == (-160.0, 240.0) for r in forced["patients"])
    result = eval_tables.evaluate_split(cache, ["B1", "C1"], ["A1"], bm3d=False)
    assert [tuple(s["window"]) for s in result["slices"]] == [(0.0, 80.0), (-160.0, 240.0)]
    assert result["slices"][0]["metrics"]["ldct"]["psnr_body"] == pytest.approx(by["B1"]["psnr_body"])
    # A cache from before body_part (manifest version 1) is refused with what to run, and rebuilt.
    stale = json.loads((cache / "manifest.json").read_text())
    stale["version"] = 1
    for entry in stale["patients"].values():
        del entry["body_part"]
    (cache / "manifest.json").write_text(json.dumps(stale))
    with pytest.raises(ValueError, match="version 1 is not 2; rebuild the cache with `ldct data index`"):
        load_manifest(cache)
    rebuilt = build_cache(tmp_path / "tree", cache, progress=False)
    assert rebuilt.version == 2 and rebuilt.patients["B1"]["body_part"] == "HEAD"
