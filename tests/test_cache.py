"""ldct.data.cache and the `ldct data` commands: arrays, manifest, incremental and idempotent
re-runs, interrupted runs, ensure_data, baselines."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import ct_image, write_dicom
from pydicom.uid import MPEG2MPML

from ldct.cli import main
from ldct.config import DataConfig
from ldct.data.cache import (
    baseline_table,
    build_cache,
    ensure_data,
    load_manifest,
    open_patient,
)
from ldct.data.dicom import DicomError, read_hu
from ldct.data.manifest import MANIFEST
from ldct.metrics import METRIC_NAMES, all_metrics, window_for


def _stamps(cache: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(cache.glob("*.npy"))}


def test_cache_holds_int16_hu_and_a_complete_manifest(mayo_tree, tmp_path):
    cache = tmp_path / "cache"
    manifest = build_cache(mayo_tree, cache, progress=False)
    assert manifest.layout == "mayo" and manifest.source == "dicom" and manifest.root == str(mayo_tree)
    assert manifest.splits == {"train": ["L001"], "val": ["L002"], "test": ["L003"]}
    assert manifest == load_manifest(cache)
    low, full = open_patient(cache, "L001")
    assert isinstance(low, np.memmap) and low.dtype == np.int16 and low.shape == (3, 16, 16)
    entry = manifest.patients["L001"]
    assert entry["shape"] == [3, 16, 16] and entry["spacing"] == [0.7, 0.7]
    zs = [s["z"] for s in entry["slices"]]
    assert zs == sorted(zs)
    for i, s in enumerate(entry["slices"]):
        hu, meta = read_hu(mayo_tree / s["full"])
        np.testing.assert_array_equal(full[i], np.rint(hu))
        assert s["full_sop"] == meta["sop_uid"] and meta["z"] == s["z"]
        np.testing.assert_array_equal(low[i], np.rint(read_hu(mayo_tree / s["low"])[0]))
    with pytest.raises(KeyError, match="'L999' is not in the cache"):
        open_patient(cache, "L999")


def test_rerun_is_a_noop_and_a_change_rereads_only_that_patient(mayo_tree, tmp_path):
    cache = tmp_path / "cache"
    build_cache(mayo_tree, cache, progress=False)
    manifest_bytes = (cache / MANIFEST).read_bytes()
    stamps = _stamps(cache)
    build_cache(mayo_tree, cache, progress=False)
    assert (cache / MANIFEST).read_bytes() == manifest_bytes and _stamps(cache) == stamps

    # Replace one slice of L002 with different pixels: only L002 is re-read.
    changed = mayo_tree / "L002" / "full_3mm" / "0001.IMA"
    z = read_hu(changed)[1]["z"]
    changed.unlink()
    write_dicom(changed, ct_image(99), patient="L002", z=z)
    build_cache(mayo_tree, cache, progress=False)
    after = _stamps(cache)
    assert {k for k in after if after[k] != stamps[k]} == {"L002_low.npy", "L002_full.npy"}
    assert (cache / MANIFEST).read_bytes() != manifest_bytes
    slot = [s["z"] for s in load_manifest(cache).patients["L002"]["slices"]].index(z)
    np.testing.assert_array_equal(open_patient(cache, "L002")[1][slot], ct_image(99))

    # A patient that leaves the tree leaves the cache.
    shutil.rmtree(mayo_tree / "L001")
    manifest = build_cache(mayo_tree, cache, val=["L002"], test=["L003"], progress=False)
    assert sorted(manifest.patients) == ["L002", "L003"] and not (cache / "L001_low.npy").exists()


def test_bad_file_never_destroys_cached_patients(mayo_tree, tmp_path):
    cache = tmp_path / "cache"
    build_cache(mayo_tree, cache, progress=False)
    manifest_bytes, stamps = (cache / MANIFEST).read_bytes(), _stamps(cache)
    (mayo_tree / "L002" / "quarter_3mm" / "0009.IMA").write_bytes(b"broken")
    with pytest.raises(DicomError, match="0009.IMA: not a DICOM file"):
        build_cache(mayo_tree, cache, progress=False)
    assert (cache / MANIFEST).read_bytes() == manifest_bytes and _stamps(cache) == stamps

    manifest = build_cache(mayo_tree, cache, skip_bad=True, progress=False)
    assert manifest.patients["L002"]["shape"][0] == 2  # the extra broken file is skipped
    assert [s[0] for s in manifest.patients["L002"]["skipped"]] == ["L002/quarter_3mm/0009.IMA"]
    assert _stamps(cache)["L001_low.npy"] == stamps["L001_low.npy"]
    assert main(["data", "index", str(mayo_tree), "--cache", str(cache), "--quiet"]) == 1  # strict again


def test_failure_while_reading_pixels_keeps_finished_patients(mayo_tree, tmp_path):
    # L003's pixels cannot be decoded: discovery passes (headers are fine), reading fails after
    # L001 and L002 are done. The manifest then describes exactly those two.
    bad = mayo_tree / "L003" / "quarter_3mm" / "0001.IMA"
    z = read_hu(bad)[1]["z"]
    bad.unlink()
    write_dicom(bad, patient="L003", z=z, transfer_syntax=MPEG2MPML)  # no plugin decodes MPEG-2
    cache = tmp_path / "cache"
    with pytest.raises(DicomError, match="no decoder for MPEG2"):
        build_cache(mayo_tree, cache, progress=False)
    assert sorted(load_manifest(cache).patients) == ["L001", "L002"]
    stamps = _stamps(cache)
    bad.unlink()
    write_dicom(bad, ct_image(5), patient="L003", z=z)
    manifest = build_cache(mayo_tree, cache, progress=False)
    assert sorted(manifest.patients) == ["L001", "L002", "L003"]
    assert {k: v for k, v in _stamps(cache).items() if k in stamps} == stamps  # only L003 was read
    assert not list(cache.glob(".*"))  # no temporary files left behind


def test_named_splits_persist_and_are_checked(mayo_tree, tmp_path):
    cache = tmp_path / "cache"
    manifest = build_cache(mayo_tree, cache, val=["L001"], test=["L002"], progress=False)
    assert manifest.splits == {"train": ["L003"], "val": ["L001"], "test": ["L002"]}
    assert build_cache(mayo_tree, cache, progress=False).splits == manifest.splits
    with pytest.raises(DicomError, match="not in the data"):
        build_cache(mayo_tree, cache, test=["L999"], progress=False)


def test_builtin_cache_has_the_builtin_splits(builtin_cache):
    manifest = load_manifest(builtin_cache)
    assert manifest.source == "builtin"
    # Phantoms validate and test; the real slices train (each is a LOSO test fold when named).
    assert manifest.splits == {
        "train": ["ABDOMEN", "CTSMALL", "HEAD693", "HEADJ2K", "SPINE"],
        "val": ["PH01"],
        "test": ["PH02"],
    }
    assert manifest.patients["CTSMALL"]["shape"] == [1, 128, 128]
    assert manifest.patients["ABDOMEN"]["shape"] == manifest.patients["HEAD693"]["shape"] == [1, 512, 512]


def test_baseline_table_matches_the_metrics(builtin_cache):
    table = baseline_table(builtin_cache, split="train")
    low, full = open_patient(builtin_cache, "CTSMALL")  # no BodyPartExamined: soft-tissue window
    expected = {
        k: float(v.mean())
        for k, v in all_metrics(np.asarray(low, np.float32), np.asarray(full, np.float32)).items()
    }
    patients = ["ABDOMEN", "CTSMALL", "HEAD693", "HEADJ2K", "SPINE"]  # the built-in train split
    assert [r["patient"] for r in table["patients"]] == patients
    row = next(r for r in table["patients"] if r["patient"] == "CTSMALL")
    assert row["slices"] == 1
    for k, v in expected.items():
        assert row[k] == pytest.approx(v)
    # The split's mean is over slices (phantom 64² and real 512² slices alike), each patient's
    # body metrics in the window of its BodyPartExamined (the head slices in the brain window).
    per_slice: dict[str, list[float]] = {}
    entries = load_manifest(builtin_cache).patients
    for patient in patients:
        lo, fu = open_patient(builtin_cache, patient)
        window = window_for(entries[patient]["body_part"])
        for k, v in all_metrics(np.asarray(lo, np.float32), np.asarray(fu, np.float32), window).items():
            per_slice.setdefault(k, []).extend(v.tolist())
    for k, v in per_slice.items():
        assert table["mean"][k] == pytest.approx(float(np.mean(v)))
    with pytest.raises(ValueError, match="unknown split 'nope'"):
        baseline_table(builtin_cache, split="nope")


def test_ensure_data_builds_the_builtin_set_once_even_when_raced(tmp_path, monkeypatch):
    monkeypatch.setenv("LDCT_HOME", str(tmp_path / "home"))
    cfg = DataConfig(builtin_phantoms=2, builtin_slices=1, builtin_size=32)
    results, errors = [], []

    def call():
        try:
            results.append(ensure_data(cfg))
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    cache_dir, splits = results[0]
    assert splits == {
        "train": ["ABDOMEN", "CTSMALL", "HEAD693", "HEADJ2K", "SPINE"],
        "val": ["PH01"],
        "test": ["PH02"],
    }
    assert cache_dir.parent.parent == tmp_path / "home" and cache_dir.parent.name.startswith("builtin-")
    assert len(list((tmp_path / "home").glob("builtin-*"))) == 1
    stamps = _stamps(cache_dir)
    assert ensure_data(cfg) == results[0] and _stamps(cache_dir) == stamps
    # Config-named held-out patients override the manifest's splits.
    _, splits = ensure_data(
        DataConfig(builtin_phantoms=2, builtin_slices=1, builtin_size=32, val_patients=("HEAD693",))
    )
    assert splits == {
        "train": ["ABDOMEN", "CTSMALL", "HEADJ2K", "PH01", "SPINE"],
        "val": ["HEAD693"],
        "test": ["PH02"],
    }


def test_ensure_data_indexes_a_given_root(tcia_tree, tmp_path):
    cache_dir, splits = ensure_data(DataConfig(root=str(tcia_tree), cache=str(tmp_path / "c")))
    # Two patients: one trains, the last tests (a val patient would leave nothing to train on).
    assert cache_dir == tmp_path / "c" and splits == {"train": ["C001"], "val": [], "test": ["C002"]}
    assert load_manifest(cache_dir).layout == "tcia"


# --------------------------------------------------------------------------- CLI


def test_cli_builtin_index_baseline(tmp_path, capsys):
    out, cache = tmp_path / "dicom", tmp_path / "cache"
    args = ["--phantoms", "2", "--slices", "1", "--size", "32", "--quiet"]
    assert main(["data", "builtin", str(out), *args]) == 0
    assert main(["data", "index", str(out), "--cache", str(cache), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "7 patients" in text and "test  PH02" in text
    assert "train ABDOMEN, CTSMALL, HEAD693, HEADJ2K, SPINE" in text
    assert main(["data", "baseline", str(cache), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["split"] == "test" and [r["patient"] for r in table["patients"]] == ["PH02"]
    assert set(table["patients"][0]) == {"patient", "slices", "body_part", "window", *METRIC_NAMES}
    # The built-in set carries BodyPartExamined: the head slices are scored in the brain window.
    parts = {p: e["body_part"] for p, e in load_manifest(cache).patients.items()}
    assert parts["HEAD693"] == parts["HEADJ2K"] == "HEAD" and parts["ABDOMEN"] == "PANCREAS"
    assert parts["PH01"] == "" and table["patients"][0]["window"] == [-160.0, 240.0]
    assert (
        20 < table["mean"]["psnr_window"] < 40 and table["mean"]["psnr_full"] > table["mean"]["psnr_window"]
    )
    assert main(["data", "baseline", str(cache), "--split", "val"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[0] == "PH01" and lines[-1].split()[0] == "mean"


def test_cli_tcia_tree_with_named_splits(tcia_tree, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert (
        main(
            [
                "data",
                "index",
                str(tcia_tree),
                "--cache",
                str(cache),
                "--test",
                "C001",
                "--val",
                "C002",
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["data", "baseline", str(cache), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert [r["patient"] for r in table["patients"]] == ["C001"] and table["mean"]["slices"] == 2
    assert table["mean"]["rmse_hu"] == pytest.approx(20.0, rel=0.3)  # the fixtures' 20 HU noise


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    assert main(["data", "builtin", str(tmp_path / "x"), "--quiet"]) == 1
    assert "not empty and is not a built-in tree" in capsys.readouterr().err
    assert main(["data", "index", str(tmp_path / "none"), "--cache", str(tmp_path / "c")]) == 1
    assert "no such directory" in capsys.readouterr().err
    assert main(["data", "baseline", str(tmp_path / "c")]) == 1
    assert "ldct data index" in capsys.readouterr().err
