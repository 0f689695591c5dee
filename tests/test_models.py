"""Generator and critic: shapes, the feature contract of tf_efficientnetv2_m, identity at init,
encoder weights from files and caches, per-sample critic scores."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch

from ldct.config import ModelConfig
from ldct.models.critic import Critic, build_critic
from ldct.models.generator import Generator, WeightsNotFoundError, build_generator


@pytest.fixture(scope="module")
def effv2m() -> Generator:
    torch.manual_seed(0)
    return Generator("tf_efficientnetv2_m").eval()


def test_effv2m_feature_contract(effv2m):
    # The paper's stages 3/5/7 are timm's blocks.2/4/6 and ModelConfig's default selects them.
    assert ModelConfig().out_indices == (2, 3, 4)
    assert effv2m.feature_modules == ("blocks.2", "blocks.4", "blocks.6")
    assert effv2m.feature_channels == (80, 176, 512)
    assert effv2m.feature_reductions == (8, 16, 32)
    n_encoder = sum(p.numel() for p in effv2m.encoder.parameters())
    assert 52e6 <= n_encoder <= 54e6, n_encoder


@pytest.mark.parametrize("size", [(64, 64), (512, 512)])
def test_effv2m_forward_is_identity_at_init(effv2m, size):
    x = torch.rand(1, 1, *size)
    with torch.no_grad():
        y = effv2m(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert torch.equal(y, x)  # zero-initialised last conv: training starts at the LDCT input


@pytest.mark.parametrize(
    ("encoder", "out_indices", "size"),
    [
        ("tf_efficientnetv2_b0", (2, 3, 4), (100, 77)),
        ("tf_efficientnetv2_b0", (2, 3, 4), (16, 16)),
        ("resnet10t", (1, 2, 3), (48, 80)),
        ("mobilenetv3_small_050", (2, 3, 4), (64, 64)),
    ],
)
def test_small_encoders_any_size(encoder, out_indices, size):
    torch.manual_seed(0)
    g = Generator(encoder, out_indices=out_indices, decoder_channels=16)
    # Non-zero last conv: the residual path must produce finite, non-trivial values and
    # gradients that reach the encoder's stem.
    torch.nn.init.normal_(g.out.weight, std=0.1)
    x = torch.rand(2, 1, *size)
    y = g(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert not torch.equal(y, x)
    y.square().mean().backward()
    stem_grads = [p.grad for p in g.encoder.parameters() if p.ndim == 4][0]
    assert stem_grads is not None and stem_grads.abs().sum() > 0


def test_decoder_widths_follow_feature_info():
    g = Generator("resnet10t", out_indices=(2, 3, 4), decoder_channels=24)
    assert [lat.in_channels for lat in g.laterals] == [128, 256, 512]
    assert all(lat.out_channels == 24 for lat in g.laterals)


def test_bad_inputs():
    g = Generator("resnet10t", decoder_channels=8)
    with pytest.raises(ValueError, match=r"\[N,1,H,W\]"):
        g(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="out_indices"):
        Generator("resnet10t", out_indices=())


def test_build_generator_from_config():
    cfg = ModelConfig(encoder="resnet10t", out_indices=(1, 2, 3), decoder_channels=8)
    g = build_generator(cfg)
    assert g.feature_reductions == (4, 8, 16)
    assert g.encoder_weights_source == "none"


def test_encoder_weights_round_trip(tmp_path):
    torch.manual_seed(1)
    src = Generator("resnet10t", decoder_channels=8)
    path = tmp_path / "enc.pth"
    torch.save({f"module.{k}": v for k, v in src.encoder.state_dict().items()}, path)
    torch.manual_seed(2)
    dst = Generator("resnet10t", decoder_channels=8, encoder_weights=str(path))
    for (k, a), b in zip(src.encoder.state_dict().items(), dst.encoder.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert dst.encoder_weights_source == f"file:{path.resolve()}"


def test_encoder_weights_from_3_channel_classifier(tmp_path):
    torch.manual_seed(3)
    full = timm.create_model("resnet10t", pretrained=False, in_chans=3)  # with fc head
    path = tmp_path / "resnet10t_cls.pth"
    torch.save(full.state_dict(), path)
    g = Generator("resnet10t", decoder_channels=8, encoder_weights=str(path))
    stem = full.state_dict()["conv1.0.weight"]  # [24,3,3,3] -> summed to [24,1,3,3]
    assert torch.allclose(g.encoder.state_dict()["conv1.0.weight"], stem.sum(1, keepdim=True))
    assert torch.equal(
        g.encoder.state_dict()["layer4.0.conv2.weight"], full.state_dict()["layer4.0.conv2.weight"]
    )


def test_encoder_weights_wrong_file(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet10t", features_only=True, in_chans=1).state_dict(), path)
    with pytest.raises(ValueError, match="missing keys"):
        Generator("tf_efficientnetv2_b0", decoder_channels=8, encoder_weights=str(path))
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        Generator("resnet10t", decoder_channels=8, encoder_weights=str(tmp_path / "nope.pth"))


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point the torch hub and Hugging Face caches at empty directories."""
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def test_imagenet_weights_missing_is_a_clear_error(empty_caches):
    with pytest.raises(WeightsNotFoundError) as info:
        Generator("resnet10t", decoder_channels=8, encoder_weights="imagenet")
    message = str(info.value)
    assert "not on disk" in message and "resnet10t_176_c3-f3215ab1.pth" in message
    assert "models--timm--resnet10t.c3_in1k" in message and "encoder_weights" in message


def test_imagenet_weights_from_torch_hub_cache(empty_caches):
    torch.manual_seed(4)
    full = timm.create_model("resnet10t", pretrained=False, in_chans=3)
    url = timm.models.get_pretrained_cfg("resnet10t").url
    path = empty_caches / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True)
    torch.save(full.state_dict(), path)
    g = Generator("resnet10t", decoder_channels=8, encoder_weights="imagenet")
    assert g.encoder_weights_source == f"imagenet:{path}"
    stem = full.state_dict()["conv1.0.weight"]
    assert torch.allclose(g.encoder.state_dict()["conv1.0.weight"], stem.sum(1, keepdim=True))


@pytest.mark.parametrize("size", [(16, 16), (64, 64), (100, 77)])
def test_critic_shapes(size):
    c = Critic(8)
    scores = c(torch.rand(3, 1, *size))
    assert scores.shape == (3,)
    assert torch.isfinite(scores).all()


def test_critic_is_per_sample_and_has_no_batch_norm():
    torch.manual_seed(0)
    c = build_critic(ModelConfig(critic_channels=8))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in c.modules())
    a, b = torch.rand(1, 1, 32, 32), torch.rand(4, 1, 32, 32)
    assert torch.allclose(c(torch.cat([a, b]))[0], c(a)[0], atol=1e-6)
    with pytest.raises(ValueError, match="at least 16x16"):
        c(torch.rand(1, 1, 15, 32))


def test_traced_generator_pads_other_sizes():
    # Export traces the model once; padding must not be a branch the tracer freezes.
    torch.manual_seed(0)
    g = Generator("resnet10t", decoder_channels=8).eval()
    torch.nn.init.normal_(g.out.weight, std=0.1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the shape checks in forward
        traced = torch.jit.trace(g, torch.rand(1, 1, 64, 64))
    x = torch.rand(1, 1, 100, 77)
    with torch.no_grad():
        assert torch.allclose(traced(x), g(x), atol=1e-6)


def test_input_standardisation_follows_the_normalisation_and_travels_in_the_state_dict():
    from ldct.config import HUNormalization

    torch.manual_seed(0)
    default = Generator("resnet10t", out_indices=(1, 2, 3), decoder_channels=8)
    # The default normalisation keeps the earlier constants exactly: (x - 0.25) / 0.05.
    assert float(default.standardize.center) == 0.25 and float(default.standardize.scale) == pytest.approx(
        0.05
    )
    narrow = HUNormalization(hu_min=-1000.0, hu_max=1000.0)
    g = Generator("resnet10t", out_indices=(1, 2, 3), decoder_channels=8, normalization=narrow)
    # 0 HU is 0.5 in [-1000, 1000] units; 204.8 HU is 0.1024 of the span.
    assert float(g.standardize.center) == pytest.approx(0.5) and float(g.standardize.scale) == pytest.approx(
        0.1024
    )
    state = g.state_dict()
    assert {"standardize.center", "standardize.scale"} <= set(state)
    # Rebuilt with the default normalisation (as a checkpoint loader does), the state_dict's
    # buffers win: export and denoise keep what the model was trained with.
    rebuilt = Generator("resnet10t", out_indices=(1, 2, 3), decoder_channels=8)
    rebuilt.load_state_dict(state)
    assert float(rebuilt.standardize.center) == pytest.approx(0.5)
    # A state_dict written before the buffers existed loads with the old hard-coded constants.
    old = {k: v for k, v in state.items() if not k.startswith("standardize.")}
    legacy = Generator("resnet10t", out_indices=(1, 2, 3), decoder_channels=8, normalization=narrow)
    legacy.load_state_dict(old)
    assert float(legacy.standardize.center) == 0.25 and float(legacy.standardize.scale) == pytest.approx(0.05)
    # Traced (export) models keep the buffers as constants.
    torch.nn.init.normal_(g.out.weight, std=0.1)
    x = torch.rand(1, 1, 32, 32)
    traced = torch.jit.trace(g.eval(), x)
    assert torch.allclose(traced(x), g(x))


def test_critic_standardises_its_input_like_the_generator():
    from ldct.config import HUNormalization

    torch.manual_seed(0)
    c = Critic(8, normalization=HUNormalization(-1000.0, 1000.0))
    x = torch.rand(3, 1, 32, 32)
    z = (x - 0.5) / 0.1024
    assert torch.allclose(c(x), c.score_standardized(z))
    assert {"standardize.center", "standardize.scale"} <= set(c.state_dict())
    # An old critic state_dict (no buffers) was trained on the raw input: it loads as identity.
    old = {k: v for k, v in c.state_dict().items() if not k.startswith("standardize.")}
    legacy = Critic(8)
    legacy.load_state_dict(old)
    assert torch.allclose(legacy(x), c.score_standardized(x))
