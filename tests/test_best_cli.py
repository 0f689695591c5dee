"""`ldct-best` against a real MLflow store: show, validate (promote / refuse), export, denoise."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest
from _registry import register_smoke
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from ldct.cli import best_main
from ldct.registry import versions as registry_versions
from ldct.tracking import store as tracking_store


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A smoke-trained generator registered as version 1 with alias `candidate` in a SQLite store."""
    uri, version, _ = register_smoke(tmp_path_factory.mktemp("registry"))
    return uri, version


def _aliases(uri: str) -> dict[str, str]:
    model = tracking_store.client(uri).get_registered_model(registry_versions.MODEL_NAME)
    return {alias: str(v) for alias, v in model.aliases.items()}


def test_validate_promotes_with_a_reachable_bar(registry, capsys):
    uri, version = registry
    code = best_main(
        ["--tracking-uri", uri, "validate", "--device", "cpu", "--min-fps", "0.01", "--repeats", "1"]
    )
    assert code == 0, capsys.readouterr()
    assert _aliases(uri)["champion"] == version
    tags = tracking_store.client(uri).get_model_version(registry_versions.MODEL_NAME, version).tags
    assert float(tags["fps"]) > 0.01
    assert tags["fps_device_type"] == "cpu" and tags["fps_precision"] == "fp32"
    assert json.loads(tags["fps_libraries"])["torch_version"].startswith("2.")


def test_validate_refuses_an_impossible_bar(registry, capsys):
    uri, _ = registry
    before = _aliases(uri)
    code = best_main(
        ["--tracking-uri", uri, "validate", "--device", "cpu", "--min-fps", "1e9", "--repeats", "1"]
    )
    assert code == 1
    assert "FAIL" in capsys.readouterr().err
    assert _aliases(uri) == before


def test_validate_on_cpu_needs_an_explicit_bar(registry, capsys):
    uri, _ = registry
    assert best_main(["--tracking-uri", uri, "validate", "--device", "cpu"]) == 2
    assert "--min-fps" in capsys.readouterr().err


def test_show_lists_versions_with_aliases(registry, capsys):
    uri, version = registry
    assert best_main(["--tracking-uri", uri, "show"]) == 0
    out = capsys.readouterr().out
    assert "candidate" in out and version in out and "ldct-pyfunc-1" in out


def test_show_with_nothing_registered_says_so_on_stderr(tmp_path, capsys):
    assert best_main(["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "show"]) == 1
    captured = capsys.readouterr()
    assert "no registered versions" in captured.err and captured.out == ""


def test_unknown_alias_names_what_exists(registry, capsys):
    uri, _ = registry
    assert best_main(["--tracking-uri", uri, "export", "--alias", "nope", "--out", "x"]) == 1
    assert "registered: v1" in capsys.readouterr().err


@pytest.mark.slow
def test_export_then_denoise(registry, tmp_path, capsys):
    uri, version = registry
    out = tmp_path / "dist"
    assert best_main(["--tracking-uri", uri, "export", "--version", version, "--out", str(out)]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["version"] == version and card["parity_max_abs_hu"] <= 1.0
    assert card["normalization"]["hu_min"] == -1024.0
    assert {"ldct", "denoised"} <= set(card["metrics"]["validation"])
    assert (out / "model.onnx").stat().st_size > 0 and (out / "model.pt").stat().st_size > 0
    # A second export into the same place is refused without --force.
    assert best_main(["--tracking-uri", uri, "export", "--version", version, "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err

    series = tmp_path / "series"
    series.mkdir()
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uid = generate_uid()
    for i in range(3):
        source.SOPInstanceUID = generate_uid()
        source.SeriesInstanceUID = uid
        source.ImagePositionPatient = [0.0, 0.0, float(i)]
        source.InstanceNumber = i + 1
        source.save_as(series / f"{i}.dcm")
    (series / "broken.dcm").write_bytes(b"not a dicom file")
    before = {p.name: p.read_bytes() for p in series.iterdir()}
    denoised = tmp_path / "denoised"
    code = best_main(["--tracking-uri", uri, "denoise", str(series), str(denoised), "--model", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    assert "broken.dcm" in err
    written = sorted(denoised.rglob("*.dcm"))
    assert len(written) == 3
    for path in written:
        ds = pydicom.dcmread(path)
        assert ds.SeriesInstanceUID != uid and "DERIVED" in ds.ImageType
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.isfinite(hu).all() and hu.shape == (128, 128)
    assert {p.name: p.read_bytes() for p in series.iterdir()} == before
    shutil.rmtree(denoised)
