"""Deployment: throughput, ONNX/TorchScript export with parity, DICOM series denoising.

Everything runs for real: onnxruntime sessions, torch.jit in a fresh interpreter, pydicom files
derived from pydicom's CT_small.dcm. A tiny stand-in generator keeps it fast; the real timm
Generator is exported once in a test marked slow.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pydicom
import pytest
import torch
from _tiny_models import TinyGenerator
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from ldct.config import HUNormalization
from ldct.deploy.denoise import DenoiseError, denoise_series
from ldct.deploy.export import ExportParityError, export_bundle, load_exported, reference_slice
from ldct.deploy.throughput import check_bar, default_min_fps, measure_fps, resolve_min_fps

NORM = HUNormalization()
SPAN = NORM.hu_max - NORM.hu_min
META = {
    "config": {
        "model.encoder": "tiny",
        "loss.lambda_l1": 1.0,
        "optim.lr": 1e-5,
        "normalization.hu_min": -1024.0,
    },
    "normalization": {"hu_min": NORM.hu_min, "hu_max": NORM.hu_max},
    "version": "7",
    "run_id": "0123abcd",
    "registered_model": "ldct-denoiser",
    "metrics": {
        "ldct": {
            "psnr_window": 29.2,
            "ssim_window": 0.88,
            "psnr_full": 41.0,
            "ssim_full": 0.97,
            "rmse_hu": 14.0,
        },
        "denoised": {
            "psnr_window": 31.0,
            "ssim_window": 0.91,
            "psnr_full": 43.0,
            "ssim_full": 0.98,
            "rmse_hu": 11.0,
        },
    },
    "throughput": {"fps": 3.2, "device": "cpu", "device_name": "test CPU"},
}


def _eager_hu(model: torch.nn.Module, hu: np.ndarray) -> np.ndarray:
    """The reference: eager fp32 PyTorch on the normalised slice, back in HU."""
    unit = torch.from_numpy(NORM.to_unit(hu.astype(np.float32)).astype(np.float32))[None, None]
    with torch.inference_mode():
        return NORM.to_hu(model.eval()(unit)[0, 0].numpy().astype(np.float64))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny() -> TinyGenerator:
    return TinyGenerator().eval()


@pytest.fixture(scope="module")
def bundle(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "bundle"
    export_bundle(tiny, META, out)
    return out


# ------------------------------------------------------------------------------- throughput


def test_measure_fps_structure(tiny):
    before = [p.clone() for p in tiny.parameters()]
    result = measure_fps(tiny, size=64, batch_sizes=(1, 2), warmup=1, repeats=3)
    assert set(result["per_batch"]) == {"1", "2"}
    for batch, row in result["per_batch"].items():
        assert row["median_s"] > 0 and len(row["seconds"]) == 3
        assert row["fps"] == pytest.approx(int(batch) / row["median_s"])
    assert result["fps"] == max(r["fps"] for r in result["per_batch"].values())
    assert (
        result["batch"] in (1, 2)
        and result["median_s"] == result["per_batch"][str(result["batch"])]["median_s"]
    )
    assert result["precision"] == "fp32" and result["device"] == "cpu" and result["size"] == 64
    assert "threads" in result["device_name"] and result["torch_version"] == torch.__version__
    assert result["onnxruntime_version"] == ort.__version__
    json.dumps(result)  # goes into tags and cards as it is
    assert not tiny.training and all(
        torch.equal(a, b) for a, b in zip(before, tiny.parameters(), strict=True)
    )
    with pytest.raises(ValueError, match="fp16"):
        measure_fps(tiny, size=32, precision="fp16")


def test_fps_bar():
    result = {"fps": 10.0}
    assert check_bar(result, 9.5) and check_bar(result, 10.0) and not check_bar(result, 12.5)
    assert default_min_fps("cuda") == 12.5 and default_min_fps("cuda:0") == 12.5
    assert default_min_fps("cpu") is None
    assert resolve_min_fps("cpu", 2.0) == 2.0 and resolve_min_fps("cuda") == 12.5
    with pytest.raises(ValueError, match="explicitly"):
        resolve_min_fps("cpu")
    with pytest.raises(ValueError):
        check_bar(result, None)


# ------------------------------------------------------------------------------- export


def test_export_card_and_parity(bundle):
    assert sorted(p.name for p in bundle.iterdir()) == [
        "model.bin",
        "model.onnx",
        "model.pt",
        "model.xml",
        "model_card.json",
    ]
    card = json.loads((bundle / "model_card.json").read_text())
    assert card["version"] == "7" and card["run_id"] == "0123abcd"
    assert card["metrics"]["ldct"]["psnr_window"] == 29.2 and "psnr_full" in card["metrics"]["denoised"]
    assert card["hyperparameters"]["loss.lambda_l1"] == 1.0
    assert card["throughput"]["fps"] == 3.2
    assert card["normalization"]["hu_min"] == -1024.0 and card["normalization"]["hu_max"] == 3072.0
    assert card["normalization"]["forward"] == "HU -> clip to [hu_min,hu_max] -> (hu-hu_min)/(hu_max-hu_min)"
    assert card["input"]["name"] == "input" and card["input"]["dtype"] == "float32"
    assert card["input"]["shape"] == ["batch", 1, "height", "width"] and card["input"]["range"] == [0.0, 1.0]
    parity = card["parity"]
    assert parity["reference"] == "pydicom CT_small.dcm"
    assert parity["max_abs_hu_onnxruntime"] <= 1.0 and parity["max_abs_hu_torchscript"] <= 1.0
    assert parity["max_abs_hu_openvino"] <= 1.0
    assert card["parity_max_abs_hu"] == parity["max_abs_hu_onnxruntime"]
    assert card["files"]["model.onnx"]["sha256"] == _sha(bundle / "model.onnx")
    assert card["files"]["model.pt"]["format"] == "torchscript"
    assert card["files"]["model.xml"]["sha256"] == _sha(bundle / "model.xml")
    assert card["versions"]["openvino"] and card["precision_gate"] is None  # never validated


def test_onnx_dynamic_shapes(bundle, tiny):
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()] == [["batch", 1, "height", "width"]]
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 64, 64), (3, 1, 128, 96), (1, 1, 512, 512), (3, 1, 100, 77)]:
        x = rng.random(shape, dtype=np.float32)
        got = session.run(None, {"input": x})[0]
        with torch.inference_mode():
            want = tiny(torch.from_numpy(x)).numpy()
        assert got.shape == shape
        assert np.abs(got - want).max() * SPAN <= 1.0, shape


def test_torchscript_loads_without_project(bundle, tiny, tmp_path):
    """model.pt in a fresh isolated interpreter (-I, cwd outside the project, ldct/timm blocked)."""
    out = tmp_path / "ts_outputs.npz"
    code = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("ldct", "timm"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import numpy as np, torch
        model = torch.jit.load({str(bundle / "model.pt")!r}).eval()
        outs = {{}}
        for shape in [(1, 1, 64, 64), (3, 1, 128, 96), (2, 1, 100, 77)]:
            x = torch.from_numpy(np.random.default_rng(1).random(shape, dtype=np.float32))
            with torch.inference_mode():
                outs["x" + "_".join(map(str, shape))] = x.numpy()
                outs["y" + "_".join(map(str, shape))] = model(x).numpy()
        assert not any(m.split(".")[0] in ("ldct", "timm") for m in sys.modules)
        np.savez({str(out)!r}, **outs)
        """
    )
    subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, check=True, timeout=120)
    data = np.load(out)
    for key in [k for k in data.files if k.startswith("x")]:
        with torch.inference_mode():
            want = tiny(torch.from_numpy(data[key])).numpy()
        got = data["y" + key[1:]]
        assert got.shape == want.shape and np.abs(got - want).max() * SPAN <= 1.0, key


def test_export_refuses_existing_unless_forced(bundle, tiny, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    before = _sha(target / "model_card.json")
    with pytest.raises(FileExistsError, match="--force") as err:
        export_bundle(tiny, META, target)
    assert str(target) in str(err.value) and _sha(target / "model_card.json") == before
    card = export_bundle(tiny, {**META, "version": "8"}, target, force=True)
    assert card["version"] == "8"
    assert json.loads((target / "model_card.json").read_text())["version"] == "8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temp or backup dirs left
    assert load_exported(target, "torch").card["version"] == "8"


class _Divergent(TinyGenerator):
    """Behaves differently while being exported/traced: the parity check must catch it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            return y + 0.01  # ~41 HU
        return y


def test_export_parity_failure_writes_nothing(tmp_path):
    target = tmp_path / "bundle"
    with pytest.raises(ExportParityError, match="HU"):
        export_bundle(_Divergent(), META, target)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_export_real_generator(tmp_path):
    """The timm Generator (TF-SAME convs, pad-to-32 branch) exports with dynamic sizes."""
    generator_mod = pytest.importorskip("ldct.models.generator")
    torch.manual_seed(0)
    gen = generator_mod.Generator("tf_mobilenetv3_small_minimal_100", (2, 3, 4), 16).eval()
    torch.nn.init.normal_(gen.out.weight, std=0.01)  # not the identity
    card = export_bundle(gen, META, tmp_path / "bundle")
    assert card["export"]["timm_same_convs_made_static"] > 0
    assert card["parity"]["max_abs_hu_onnxruntime"] <= 1.0 and card["parity"]["max_abs_hu_torchscript"] <= 1.0
    model = load_exported(tmp_path / "bundle", "onnxruntime")
    for shape in [(1, 1, 64, 64), (3, 1, 128, 96), (1, 1, 90, 70)]:
        x = np.random.default_rng(2).random(shape, dtype=np.float32)
        with torch.inference_mode():
            want = gen(torch.from_numpy(x)).numpy()
        assert np.abs(model(x) - want).max() * SPAN <= 1.0, shape


# ------------------------------------------------------------------------------- denoise


def _write_series(root: Path) -> list[Path]:
    """4 slices derived from CT_small: new UIDs and z, one uint16, one RLE-compressed, one without suffix."""
    series_uid = generate_uid()
    paths = []
    for i in range(4):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        pixels = ds.pixel_array.astype(np.int32)
        pixels = np.roll(pixels, 3 * i, axis=1) + 5 * i  # different content per slice
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = "Low Dose Images"
        ds.InstanceNumber = i + 1
        z = -75.7 - 5.0 * i
        ds.ImagePositionPatient = [-158.135803, -179.035797, z]
        ds.SliceLocation = z
        if i == 1:  # unsigned storage, same intercept
            del ds.PixelPaddingValue
            ds.PixelRepresentation = 0
            ds.PixelData = pixels.astype(np.uint16).tobytes()
        else:
            ds.PixelData = pixels.astype(np.int16).tobytes()
        if i == 2:
            ds.compress(RLELossless)
        name = f"IM{i:04d}" if i == 3 else f"slice{i}.dcm"
        path = root / "study" / "series" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _check_output(src_path: Path, out_path: Path, expected_hu: np.ndarray) -> pydicom.Dataset:
    src, out = pydicom.dcmread(src_path), pydicom.dcmread(out_path)
    for tag in (
        "PatientID",
        "PatientName",
        "StudyInstanceUID",
        "FrameOfReferenceUID",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "InstanceNumber",
        "Rows",
        "Columns",
    ):
        assert out.get(tag) == src.get(tag), tag
    assert out.SeriesInstanceUID != src.SeriesInstanceUID and out.SOPInstanceUID != src.SOPInstanceUID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert list(out.ImageType[:2]) == ["DERIVED", "SECONDARY"]
    assert out.SeriesDescription == "Low Dose Images [ldct denoised]"
    assert "version 7" in out.DerivationDescription and "0123abcd" in out.DerivationDescription
    assert out.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert out.PixelRepresentation == src.PixelRepresentation
    slope, intercept = float(out.RescaleSlope), float(out.RescaleIntercept)
    hu = out.pixel_array.astype(np.float64) * slope + intercept
    info = np.iinfo(out.pixel_array.dtype)
    expected = np.clip(expected_hu, info.min * slope + intercept, info.max * slope + intercept)
    # <= 1 HU model tolerance + half a quantisation step from rounding to stored integers.
    assert np.abs(hu - expected).max() <= 1.0 + 0.5 * slope + 1e-6
    return out


def test_denoise_series_onnx(bundle, tiny, tmp_path):
    inputs = _write_series(tmp_path / "in")
    hashes = {p: _sha(p) for p in inputs}
    report = denoise_series(tmp_path / "in", tmp_path / "out", model_dir=bundle, progress=False)
    assert report["skipped"] == [] and len(report["written"]) == 4
    assert report["backend"] == "onnxruntime" and "version 7" in report["model_version"]
    outs = []
    for src in inputs:
        out_path = tmp_path / "out" / src.relative_to(tmp_path / "in")
        assert str(out_path) in report["written"]
        ds = pydicom.dcmread(src)
        hu_in = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        outs.append(_check_output(src, out_path, _eager_hu(tiny, hu_in)))
    assert len({o.SeriesInstanceUID for o in outs}) == 1
    assert len({o.SOPInstanceUID for o in outs}) == 4
    assert {p: _sha(p) for p in inputs} == hashes


def test_denoise_skips_bad_files(bundle, tiny, tmp_path):
    inputs = _write_series(tmp_path / "in")
    series = inputs[0].parent
    (series / "corrupt.dcm").write_bytes(inputs[0].read_bytes()[:700])
    (series / "notes.txt").write_text("not a DICOM file\n")
    mr = pydicom.dcmread(inputs[0])
    mr.Modality, mr.SOPClassUID = "MR", "1.2.840.10008.5.1.4.1.1.4"
    mr.save_as(series / "mr.dcm", enforce_file_format=True)
    nopix = pydicom.dcmread(inputs[0])
    del nopix.PixelData
    nopix.save_as(series / "nopixels.dcm", enforce_file_format=True)
    hashes = {p: _sha(p) for p in series.iterdir()}

    report = denoise_series(
        tmp_path / "in", tmp_path / "out", model_dir=bundle, backend="torch", progress=False
    )
    reasons = {Path(f).name: why for f, why in report["skipped"]}
    assert set(reasons) == {"corrupt.dcm", "notes.txt", "mr.dcm", "nopixels.dcm"}
    assert "not a DICOM" in reasons["notes.txt"] and "not a CT" in reasons["mr.dcm"]
    assert "no pixel data" in reasons["nopixels.dcm"] and reasons["corrupt.dcm"]
    assert report["backend"] == "torch" and len(report["written"]) == 4
    assert sorted(Path(p).name for p in report["written"]) == sorted(p.name for p in inputs)
    assert {p: _sha(p) for p in series.iterdir()} == hashes

    # An in-memory generator with its meta gives the same pixels as the exported TorchScript.
    again = denoise_series(tmp_path / "in", tmp_path / "out2", generator=tiny, meta=META, progress=False)
    assert len(again["written"]) == 4
    for a, b in zip(sorted(report["written"]), sorted(again["written"]), strict=True):
        pa, pb = pydicom.dcmread(a).pixel_array.astype(int), pydicom.dcmread(b).pixel_array.astype(int)
        assert np.abs(pa - pb).max() <= 1


def test_denoise_refuses_unsafe_output(bundle, tmp_path):
    _write_series(tmp_path / "in")
    for out in (tmp_path / "in", tmp_path / "in" / "study" / "out", tmp_path):
        with pytest.raises(DenoiseError, match="input"):
            denoise_series(tmp_path / "in", out, model_dir=bundle, progress=False)
    with pytest.raises(DenoiseError, match="meta"):
        denoise_series(tmp_path / "in", tmp_path / "o", generator=TinyGenerator(), progress=False)


def test_reference_slice_is_ct_small():
    hu, name = reference_slice()
    assert hu.shape == (128, 128) and hu.dtype == np.float32 and "CT_small" in name
    assert -1100 < hu.min() < hu.max() < 3000
