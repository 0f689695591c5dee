"""The registered model serves: `mlflow models serve` on 127.0.0.1 takes HU slices of any size and
answers what `ldct-best denoise` writes for the same slices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from _ray_fixtures import _free_port, wait_for_http
from _registry import register_smoke
from conftest import ct_image, write_dicom

from ldct.cli import best_main
from ldct.registry import model_format
from ldct.registry import versions as registry_versions
from ldct.tracking import store as tracking_store

pytestmark = pytest.mark.slow
SIZES = ((512, 512), (300, 260))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(URI, base URL, model dir): a registered smoke model served from a directory outside the checkout."""
    root = tmp_path_factory.mktemp("serve")
    uri, _, _ = register_smoke(root, onnx=True)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = uri
    # As in an activated venv: the scoring server is started as `uvicorn` from PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log = open(root / "serve.log", "w")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m",
         f"models:/{registry_versions.MODEL_NAME}@candidate", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    wait_for_http(base + "/ping", process, root / "serve.log", 180, "mlflow models serve")
    yield uri, base, root
    os.killpg(process.pid, 15)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)


def _post(base: str, hu: np.ndarray) -> np.ndarray:
    body = json.dumps({"inputs": hu[None].tolist()}).encode()
    request = urllib.request.Request(
        base + "/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return np.asarray(json.loads(response.read())["predictions"], dtype=np.float32)[0]
    except urllib.error.HTTPError as exc:
        exc.msg = f"{exc.msg}: {exc.read()[:2000]!r}"
        raise


def test_served_model_answers_like_ldct_best_denoise(served, tmp_path):
    uri, base, _ = served
    series = tmp_path / "series"
    slices = {}
    for i, (h, w) in enumerate(SIZES):
        hu = np.zeros((h, w))
        hu[: min(h, w), : min(h, w)] = ct_image(i, min(h, w))
        path = write_dicom(series / f"{i}.dcm", hu, z=float(i), instance=i + 1, series_uid="1.2.3.4")
        slices[path.name] = hu.astype(np.float32)
    out = tmp_path / "denoised"
    assert best_main(["--tracking-uri", uri, "denoise", str(series), str(out), "--alias", "candidate"]) == 0
    for name, hu in slices.items():
        served_hu = _post(base, hu)
        assert served_hu.shape == hu.shape and np.isfinite(served_hu).all()
        ds = pydicom.dcmread(out / name)
        slope = float(ds.RescaleSlope)
        written = ds.pixel_array * slope + float(ds.RescaleIntercept)
        # The DICOM stores HU rounded to its slope; within that, the answers are the same.
        assert np.abs(written - served_hu).max() <= 0.5 * slope + 1e-3, name
        # ... and the model is not the identity on its input (the answer says something).
        assert np.abs(served_hu - hu).max() > 0


def test_served_model_rejects_a_malformed_request(served):
    _, base, _ = served
    with pytest.raises(urllib.error.HTTPError) as info:
        _post(base, np.zeros(5, dtype=np.float32))  # [1, 5]: not [N, H, W]
    assert info.value.code in (400, 500)


def test_registered_version_describes_itself(served):
    uri, _, root = served
    mlflow_client = tracking_store.client(uri)
    version = mlflow_client.get_model_version_by_alias(registry_versions.MODEL_NAME, "candidate")
    assert "HU" in mlflow_client.get_registered_model(registry_versions.MODEL_NAME).description
    assert "PSNR" in version.description and "safetensors" in version.description
    stored = next((root / "mlartifacts").rglob("MLmodel")).parent
    mlmodel = yaml.safe_load((stored / "MLmodel").read_text())
    signature = json.loads(mlmodel["signature"]["inputs"])[0]
    assert signature["tensor-spec"]["shape"] == [-1, -1, -1]
    assert "pytorch" not in mlmodel["flavors"] and not list(stored.rglob("*.pkl"))
    requirements = (stored / "requirements.txt").read_text().split()
    assert all("==" in r for r in requirements if not r.startswith("mlflow")), requirements
    assert not any(r.split("==")[0] == "ldct" for r in requirements)
    # The module the models-from-code script imports travels in the model's own code copy.
    assert (stored / "code" / "ldct" / "registry" / "model_format.py").is_file()
    scripts = [s for s in stored.rglob("ldct_pyfunc.py") if "code" not in s.relative_to(stored).parts]
    assert scripts and "from ldct.registry.model_format import" in scripts[0].read_text()
    assert (stored / "artifacts" / model_format.ONNX_FILE).stat().st_size > 1000


def test_pyfunc_uses_the_code_shipped_with_the_model(served):
    """Outside the checkout (no PYTHONPATH, another cwd) pyfunc imports ldct from the model itself."""
    uri, _, root = served
    script = (
        "import mlflow.pyfunc, numpy as np, sys\n"
        f"m = mlflow.pyfunc.load_model('models:/{registry_versions.MODEL_NAME}@candidate')\n"
        "out = m.predict(np.full((1, 64, 48), 40.0, dtype=np.float32))\n"
        "print(sys.modules['ldct'].__file__, out.shape)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = uri
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    module_file, shape = done.stdout.strip().splitlines()[-1].split(" ", 1)
    assert "/code/ldct/" in module_file and shape == "(1, 64, 48)"
