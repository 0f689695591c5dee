"""Inference backends and the precision gate: real torch / onnxruntime / OpenVINO runners.

The gate is exercised with real runners of real (tiny) generators on a real built-in panel: one
whose output is shifted by 4 HU moves window PSNR by more than 0.02 dB and is refused, one with
sub-HU noise passes, and the thresholds are the config's.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from _tiny_models import TinyGenerator
from torch import nn

from ldct.config import HUNormalization, load_config
from ldct.deploy import backends, gate
from ldct.deploy.denoise import denoise_series
from ldct.deploy.export import export_bundle, load_exported, reference_slice
from ldct.deploy.throughput import measure_runner

NORM = HUNormalization()
SPAN = NORM.hu_max - NORM.hu_min
META = {"config": {"model.encoder": "tiny"}, "normalization": {"hu_min": -1024.0, "hu_max": 3072.0}}


@pytest.fixture(scope="module")
def tiny() -> TinyGenerator:
    return TinyGenerator().eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One work directory for the tiny generator: its ONNX/IR files are exported once."""
    return tmp_path_factory.mktemp("tiny-work")


@pytest.fixture(scope="module")
def bundle(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ov") / "bundle"
    export_bundle(tiny, META, out)
    return out


@pytest.fixture(scope="module")
def smoke_cfg(tmp_path_factory):
    """The smoke profile with its built-in data made under a temporary LDCT_HOME."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LDCT_HOME", str(tmp_path_factory.mktemp("ldct-home")))
        cfg = load_config("smoke")
        gate.test_panel(cfg)  # builds the set once, inside the temporary home
        yield cfg


def _eager(model: nn.Module, unit: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(unit)).numpy()


# ------------------------------------------------------------------------------- OpenVINO


def test_openvino_export_parity_on_ct_small(bundle, tiny):
    import openvino as ov

    model = ov.Core().read_model(str(bundle / "model.xml"))
    shape = model.input(0).get_partial_shape()
    assert shape[1].get_length() == 1 and all(shape[i].is_dynamic for i in (0, 2, 3))
    runner = backends.runner_from_export(bundle, "openvino", "fp32")
    hu, _ = reference_slice()
    unit = NORM.to_unit(hu).astype(np.float32)[None, None]
    assert np.abs(runner(unit) - _eager(tiny, unit)).max() * SPAN <= 1.0
    rng = np.random.default_rng(0)
    for shape in [(3, 1, 100, 77), (1, 1, 512, 512), (2, 1, 64, 96)]:
        x = rng.random(shape, dtype=np.float32)
        got = runner(x)
        assert got.shape == shape and np.abs(got - _eager(tiny, x)).max() * SPAN <= 1.0, shape
    # The IR holds fp32 weights: OpenVINO's save_model would otherwise halve them to fp16.
    assert "f16" not in (bundle / "model.xml").read_text()


def test_denoise_openvino_matches_onnxruntime(bundle, tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    src = tmp_path / "in"
    src.mkdir()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.save_as(src / "a.dcm")
    ov_report = denoise_series(src, tmp_path / "ov", model_dir=bundle, backend="openvino", progress=False)
    ort_report = denoise_series(
        src, tmp_path / "ort", model_dir=bundle, backend="onnxruntime", progress=False
    )
    assert ov_report["backend"] == "openvino" and len(ov_report["written"]) == 1
    a = pydicom.dcmread(ov_report["written"][0])
    b = pydicom.dcmread(ort_report["written"][0])
    assert "backend openvino" in a.DerivationDescription
    assert np.abs(a.pixel_array.astype(int) - b.pixel_array.astype(int)).max() <= 1


def test_denoise_cli_openvino(bundle, tmp_path, capsys):
    import pydicom
    from pydicom.data import get_testdata_file

    from ldct.cli import best_main

    series = tmp_path / "series"
    series.mkdir()
    pydicom.dcmread(get_testdata_file("CT_small.dcm")).save_as(series / "0.dcm")
    args = ["denoise", str(series), str(tmp_path / "den"), "--model", str(bundle), "--backend", "openvino"]
    assert best_main(args) == 0, capsys.readouterr()
    ds = pydicom.dcmread(tmp_path / "den" / "0.dcm")
    assert "backend openvino" in ds.DerivationDescription and "DERIVED" in ds.ImageType


def test_export_without_ir_names_the_fix(bundle, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    (old / "model.xml").unlink()
    with pytest.raises(FileNotFoundError, match="--force"):
        load_exported(old, "openvino")


# ------------------------------------------------------------------------------- runners


@pytest.mark.parametrize(
    "backend,precision,tol_hu",
    [
        ("torch", "fp32", 1e-3),
        ("onnxruntime", "fp32", 0.01),
        ("openvino", "fp32", 0.01),
        ("openvino", "bf16", 20.0),
    ],
)
def test_runners_agree_with_eager(tiny, work, backend, precision, tol_hu):
    if backends.backend_class(backend).unavailable(precision):
        # bf16 on a CPU without it must be refused, not run emulated.
        with pytest.raises(backends.BackendUnavailable, match="native bf16"):
            backends.runner_from_generator(tiny, backend, precision, workdir=work)
        return
    runner = backends.runner_from_generator(tiny, backend, precision, workdir=work)
    x = np.random.default_rng(1).random((2, 1, 72, 40), dtype=np.float32)
    err = np.abs(runner(x) - _eager(tiny, x)).max() * SPAN
    assert err <= tol_hu
    info = runner.describe()
    assert info["backend"] == backend and info["precision"] == precision and info["device"] == "cpu"
    assert "threads" in info["device_name"] and info["torch_version"] == torch.__version__
    if backend == "openvino":
        assert info["openvino_version"] and "nncf_version" not in info


def test_int8_needs_training_calibration(tiny, tmp_path):
    with pytest.raises(ValueError, match="calibration"):
        backends.runner_from_generator(tiny, "onnxruntime", "int8", workdir=tmp_path)
    with pytest.raises(ValueError, match="never test"):
        backends.runner_from_generator(tiny, "openvino", "int8", workdir=tmp_path)


def test_cpu_capabilities_follow_the_flags():
    caps = backends.cpu_capabilities()
    flags = backends.cpu_flags()
    assert caps["native_bf16"] == ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert caps["amx_bf16"] == ("amx_bf16" in flags)
    assert "FP32" in caps["openvino"]
    text = backends.format_capabilities(caps)
    assert "avx512_bf16" in text and "amx_bf16" in text
    paths = backends.candidate_paths("auto", "auto", "cpu")
    assert ("torch", "fp32") in paths and ("openvino", "fp32") in paths and ("openvino", "int8") in paths
    assert (("openvino", "bf16") in paths) == caps["native_bf16"]
    assert all(backends.BACKENDS[b].device_type == "cpu" for b, _ in paths)


def test_cuda_backends_fail_clearly_or_run(tiny, tmp_path):
    """A CUDA path never falls back to the CPU: here it is refused, naming what is missing."""
    import onnxruntime as ort

    for name, needs in [
        ("torch-cuda", torch.cuda.is_available()),
        ("onnxruntime-cuda", "CUDAExecutionProvider" in ort.get_available_providers()),
        ("tensorrt", "TensorrtExecutionProvider" in ort.get_available_providers()),
    ]:
        if needs:  # a GPU machine: the path runs on CUDA and says so
            runner = backends.runner_from_generator(tiny, name, "fp16", workdir=tmp_path / name)
            assert runner.describe()["device"] == "cuda"
            x = np.random.default_rng(2).random((1, 1, 64, 64), dtype=np.float32)
            assert np.abs(runner(x) - _eager(tiny, x)).max() * SPAN <= 20.0
            continue
        with pytest.raises(backends.BackendUnavailable, match="CUDA|Tensorrt") as err:
            backends.runner_from_generator(tiny, name, "fp16", workdir=tmp_path / name)
        assert name in str(err.value) and ("openvino" in str(err.value) or "GPU" in str(err.value))
        with pytest.raises(backends.BackendUnavailable):
            backends.candidate_paths(name, "fp16", "cuda")
    with pytest.raises(backends.BackendUnavailable, match="no precision 'int8'"):
        backends.candidate_paths("torch", "int8", "cpu")


def test_measure_runner_gates_on_batch_one(tiny):
    runner = backends.TorchRunner.from_generator(tiny, "fp32")
    result = measure_runner(runner, size=64, batch_sizes=(4,), warmup=1, repeats=3)
    assert set(result["per_batch"]) == {"1", "4"} and result["batch"] == 1
    assert result["fps"] == pytest.approx(1.0 / result["per_batch"]["1"]["median_s"])
    assert result["latency_ms"] == pytest.approx(1000 * result["per_batch"]["1"]["median_s"])
    assert result["batched_batch"] == 4 and result["batched_fps"] == result["per_batch"]["4"]["fps"]
    assert result["backend"] == "torch" and result["precision"] == "fp32"
    json.dumps(result)


# ------------------------------------------------------------------------------- the gate


class _Shifted(nn.Module):
    """The generator, then a fixed change of its output in HU (a stand-in for a lossy path)."""

    def __init__(self, base: nn.Module, offset_hu: float = 0.0, noise_hu: float = 0.0, spike_hu: float = 0.0):
        super().__init__()
        self.base, self.offset, self.noise, self.spike = (
            base,
            offset_hu / SPAN,
            noise_hu / SPAN,
            spike_hu / SPAN,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x) + self.offset
        if self.noise:
            gen = torch.Generator().manual_seed(0)
            y = y + self.noise * torch.randn(y.shape, generator=gen)
        if self.spike:
            y = y.clone()
            y[..., y.shape[-2] // 2, y.shape[-1] // 2] += self.spike
        return y


def _verdict(model: nn.Module, reference: list[np.ndarray], panel: gate.Panel, thresholds) -> dict:
    runner = backends.TorchRunner.from_generator(model, "fp32")
    return gate.judge(gate.run_panel(runner, panel, NORM), reference, panel, thresholds)


def test_gate_refuses_a_psnr_change_and_passes_a_small_one(tiny, smoke_cfg):
    panel = gate.test_panel(smoke_cfg)
    assert panel.low_hu and "test split" in panel.source
    reference = gate.run_panel(backends.TorchRunner.from_generator(tiny, "fp32"), panel, NORM)
    thresholds = smoke_cfg.deploy
    assert (thresholds.gate_psnr_db, thresholds.gate_ssim, thresholds.gate_max_abs_hu) == (0.02, 0.0005, 5.0)

    shifted = _verdict(_Shifted(tiny, offset_hu=4.0), reference, panel, thresholds)
    assert shifted["max_abs_hu"] <= 5.0  # within the HU bound, so PSNR alone refuses it
    assert abs(shifted["d_psnr_window_db"]) > 0.02 and not shifted["passed"]
    assert any("dPSNR" in f for f in shifted["failures"])

    small = _verdict(_Shifted(tiny, noise_hu=0.2), reference, panel, thresholds)
    assert small["passed"] and small["failures"] == [], small
    assert 0 < small["max_abs_hu"] <= 5.0 and abs(small["d_psnr_window_db"]) <= 0.02

    spike = _verdict(_Shifted(tiny, spike_hu=6.0), reference, panel, thresholds)
    assert not spike["passed"] and [f for f in spike["failures"] if "max |diff|" in f]
    assert abs(spike["d_psnr_window_db"]) <= 0.02  # one pixel: only the HU bound catches it

    # The thresholds are the config's: a looser PSNR bound lets the shifted path through.
    loose = dataclasses.replace(thresholds, gate_psnr_db=3.0, gate_ssim=0.1)
    assert _verdict(_Shifted(tiny, offset_hu=4.0), reference, panel, loose)["passed"]
    assert "REFUSED" in gate.format_verdict("x", shifted) and "pass" in gate.format_verdict("y", small)


def test_calibration_comes_from_training_slices(smoke_cfg):
    from ldct.data.cache import ensure_data, open_patient

    cache_dir, splits = ensure_data(smoke_cfg.data)
    slices = gate.calibration_slices(smoke_cfg)

    def clipped(patients):
        return [
            np.clip(lo, NORM.hu_min, NORM.hu_max) for p in patients for lo in open_patient(cache_dir, p)[0]
        ]

    train, test = clipped(splits["train"]), clipped(splits["test"])
    assert slices and all(s.shape[:2] == (1, 1) and s.dtype == np.float32 for s in slices)
    as_hu = [NORM.to_hu(s[0, 0]) for s in slices]
    assert all(any(h.shape == t.shape and np.abs(h - t).max() < 0.5 for t in train) for h in as_hu)
    assert not any(h.shape == t.shape and np.abs(h - t).max() < 0.5 for h in as_hu for t in test)


def test_int8_paths_are_judged(tiny, smoke_cfg, work):
    """Both int8 quantisers build from training slices and get a finite verdict on the panel."""
    panel = gate.test_panel(smoke_cfg)
    reference = gate.run_panel(backends.TorchRunner.from_generator(tiny, "fp32"), panel, NORM)
    calibration = gate.calibration_slices(smoke_cfg)
    for backend in ("onnxruntime", "openvino"):
        runner = backends.runner_from_generator(tiny, backend, "int8", workdir=work, calibration=calibration)
        verdict = gate.judge(gate.run_panel(runner, panel, NORM), reference, panel, smoke_cfg.deploy)
        # The image path stays float, so the error is the residual's alone (not 8-bit image steps).
        assert 0 < verdict["max_abs_hu"] < 50 and np.isfinite(verdict["d_psnr_window_db"]), verdict


def test_validation_reads_its_data_once_where_the_cache_is(tiny, smoke_cfg, tmp_path):
    """`validate --on-cluster` reads the panel on the head and sends it with the GPU task: given
    those inputs, validation runs with a config whose data cache this process cannot see."""
    from ldct.config import apply_overrides
    from ldct.deploy.validate import validate_paths, validation_inputs

    paths = [("torch", "fp32")]
    inputs = validation_inputs(smoke_cfg, paths)
    assert inputs[1] is None  # no int8 path, no calibration slices read
    elsewhere = apply_overrides(smoke_cfg, [f"data.root={tmp_path / 'not-here'}"])
    with pytest.raises(Exception, match="not-here"):
        validate_paths(tiny, elsewhere, paths, repeats=1, size=64, batch_sizes=(1,), log=lambda _: None)
    report = validate_paths(
        tiny, elsewhere, paths, repeats=1, size=64, batch_sizes=(1,), log=lambda _: None, inputs=inputs
    )
    assert report["panel"] == inputs[0].source and report["chosen"]["backend"] == "torch"
