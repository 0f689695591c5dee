"""The architecture registry and the RED-CNN baseline: build, train without a critic, export, denoise."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from ldct.cli import best_main
from ldct.config import load_config
from ldct.models import DEFAULT_ARCH, architectures, build_model
from ldct.models.redcnn import REDCNN
from ldct.registry import versions as registry_versions
from ldct.study.space import apply_choice, search_space, study_config
from ldct.tracking import store as tracking_store
from ldct.training.checkpoint import generator_from_state, load_state
from ldct.training.engine import build_networks, generator_step
from ldct.training.loop import run_local

# RED-CNN at a width the smoke profile can afford; the baseline's own settings otherwise.
REDCNN_SMOKE = [
    "model.arch=redcnn",
    "model.redcnn_channels=8",
    "loss.lambda_adv=0",
    "loss.lambda_perceptual=0",
]


@pytest.mark.parametrize("arch", architectures())
def test_every_registered_arch_builds_and_starts_as_identity(arch):
    cfg = load_config("smoke", [f"model.arch={arch}"])
    model = build_model(cfg.model, cfg.normalization).eval()
    assert model.arch == arch
    x = torch.rand(2, 1, 50, 70)  # not a multiple of anything
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # Zero-initialised output layer: an untrained model returns its input (the LDCT baseline).
    assert torch.allclose(y, x, atol=1e-5)


def test_registry_default_and_unknown_name():
    assert load_config("smoke").model.arch == DEFAULT_ARCH
    assert "redcnn" in architectures()
    with pytest.raises(ValueError, match="model.arch 'unet9'.*redcnn"):
        build_model(load_config("smoke", ["model.arch=unet9"]).model)


def test_redcnn_is_the_papers_network():
    net = REDCNN(channels=96)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    assert len(convs) == 10 and all(m.kernel_size == (5, 5) for m in convs)
    assert {m.out_channels for m in convs[:-1]} == {96} and convs[-1].out_channels == 1
    with pytest.raises(ValueError, match="H, W >= 21"):
        net(torch.rand(1, 1, 20, 64))
    # The redcnn CPU profile: the quick profile's iteration budget, no critic.
    quick, red = load_config("quick"), load_config("redcnn")
    assert red.model.arch == "redcnn" and red.loss.lambda_adv == 0
    for key in ("iterations", "batch_size", "val_every"):
        assert getattr(red.train, key) == getattr(quick.train, key)
    assert red.data.patch_size == quick.data.patch_size and red.study.trials == quick.study.trials


def test_no_adversarial_term_builds_no_critic():
    nets = build_networks(load_config("smoke", ["loss.lambda_adv=0"]), "cpu")
    assert nets.critic is None and nets.opt_c is None and nets.scaler_c is None
    with_critic = build_networks(load_config("smoke"), "cpu")
    assert with_critic.critic is not None and with_critic.opt_c is not None


def test_a_redcnn_study_trial_trains_without_critic_or_perceptual_net(tmp_path, monkeypatch):
    """A RED-CNN study searches lr only and its trials train with λ₃ = λ_adv = 0 whatever the
    profile's [loss] says; λ₃ = 0 builds no VGG at all, so even "imagenet" weights that are not on
    disk (a hard error for a perceptual net) are never asked for."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: no VGG file anywhere
    profile = load_config(
        "redcnn",
        [
            "model.redcnn_channels=8",
            "loss.lambda_perceptual=0.2",
            "loss.lambda_adv=1",
            "loss.perceptual_weights=imagenet",
            "loss.allow_random_perceptual=false",
        ],
    )
    assert list(search_space(profile).ranges) == [("optim.lr", 1e-5, 3e-3)]
    cfg = study_config(profile)
    assert (cfg.loss.lambda_perceptual, cfg.loss.lambda_adv) == (0.0, 0.0)
    # The Pareto study's RED-CNN choice sets the same zeros on top of an encoder's λ's.
    chosen = apply_choice({"loss.lambda_perceptual": 0.1, "loss.lambda_adv": 0.1}, "redcnn")
    assert (chosen["model.arch"], chosen["loss.lambda_perceptual"], chosen["loss.lambda_adv"]) == (
        "redcnn",
        0,
        0,
    )
    nets = build_networks(cfg, "cpu")
    assert nets.perceptual is None and nets.critic is None
    with pytest.raises(FileNotFoundError, match="perceptual.weights=imagenet"):
        build_networks(profile, "cpu")  # λ₃ = 0.2 of the profile would need the VGG file
    # The generator step computes no perceptual term (and no adversarial one).
    low, full = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    terms = generator_step(nets, low, full, cfg, step=1)
    assert "perceptual" not in terms and "adv" not in terms and terms["loss_g"] == pytest.approx(terms["l1"])


@pytest.fixture(scope="module")
def redcnn_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("redcnn")
    cfg = load_config("smoke", REDCNN_SMOKE)
    session = run_local(cfg, checkpoint_root=root / "ckpt")
    return root, session, load_state(session.checkpoints[-1])


def test_redcnn_trains_without_a_critic(redcnn_run):
    _, session, state = redcnn_run
    assert not {"critic", "opt_c", "scaler_c"} & set(state)
    assert state["config"]["model.arch"] == "redcnn" and state["step"] == 4
    last = session.reports[-1]
    assert "train_loss_critic" not in last and "train_adv" not in last
    assert np.isfinite(last["train_l1"]) and np.isfinite(last["val_psnr_window"])
    # The optimizer stepped the generator only: one parameter group, all of it RED-CNN's.
    generator, _ = generator_from_state(state)
    assert isinstance(generator, REDCNN)
    assert len(state["opt_g"]["state"]) == len(list(generator.parameters()))
    # It learned something: the zero-initialised last deconvolution moved.
    assert generator.deconvs[-1].weight.abs().sum() > 0


def test_redcnn_exports_with_parity_and_denoises_through_ldct_best(redcnn_run, tmp_path, capsys):
    root, _, state = redcnn_run
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_client = tracking_store.client(uri)
    run = mlflow_client.create_run(tracking_store.ensure_experiment(mlflow_client, "ldct/redcnn-test"))
    version = str(
        registry_versions.register_state(state, run.info.run_id, uri, tags={"study": "redcnn-test"}).version
    )
    assert mlflow_client.get_model_version(registry_versions.MODEL_NAME, version).tags["arch"] == "redcnn"
    # `show` names the architecture, not model.encoder's unused default.
    assert [r["model"] for r in registry_versions.list_versions(uri)] == ["redcnn"]
    assert best_main(["--tracking-uri", uri, "show"]) == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    column = header.index("model")
    assert row[column:].split()[0] == "redcnn" and state["config"]["model.encoder"] not in row

    out = tmp_path / "dist"
    assert best_main(["--tracking-uri", uri, "export", "--version", version, "--out", str(out)]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["architecture"]["class"] == "REDCNN" and card["architecture"]["arch"] == "redcnn"
    assert card["parity_max_abs_hu"] <= 1.0
    # ONNX against eager PyTorch on an input of a size the parity check did not use.
    import onnxruntime as ort

    generator, _ = generator_from_state(state)
    x = np.random.default_rng(0).random((3, 1, 37, 45), dtype=np.float32)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = generator(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() * 4096 <= 1.0  # ≤ 1 HU over the [-1024, 3072] range

    series = tmp_path / "series"
    series.mkdir()
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uid = generate_uid()
    for i in range(2):
        source.SOPInstanceUID = generate_uid()
        source.SeriesInstanceUID = uid
        source.ImagePositionPatient = [0.0, 0.0, float(i)]
        source.InstanceNumber = i + 1
        source.save_as(series / f"{i}.dcm")
    for args in (["--model", str(out)], ["--alias", "candidate"]):
        denoised = tmp_path / f"denoised-{args[0][2:]}"
        code = best_main(["--tracking-uri", uri, "denoise", str(series), str(denoised), *args])
        assert code == 0, capsys.readouterr().err
        written = sorted(denoised.rglob("*.dcm"))
        assert len(written) == 2
        for path in written:
            ds = pydicom.dcmread(path)
            assert ds.SeriesInstanceUID != uid and "DERIVED" in ds.ImageType
            hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            assert np.isfinite(hu).all() and hu.shape == (128, 128)
