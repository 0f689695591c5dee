"""Loss terms against hand computations; perceptual weights sources."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ldct.losses import (
    PerceptualLoss,
    cached_imagenet_file,
    critic_wasserstein,
    generator_adversarial,
    gradient_penalty,
)


def test_wasserstein_terms():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([0.0, -2.0])
    assert critic_wasserstein(real, fake).item() == pytest.approx(-1.0 - 2.0)
    assert generator_adversarial(fake).item() == pytest.approx(1.0)


class Linear(nn.Module):
    """D(x) = <w, x> + b: its input gradient is w for every sample."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w).flatten(1).sum(1) + 0.5


class Quadratic(nn.Module):
    """D(x) = k/2 ||x||²: its input gradient is k·x, different for every sample."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.k * x.square().flatten(1).sum(1)


def test_gradient_penalty_linear_critic_and_its_parameter_gradient():
    torch.manual_seed(0)
    w = torch.randn(1, 1, 4, 5) * 0.3
    critic = Linear(w)
    real, fake = torch.rand(3, 1, 4, 5), torch.rand(3, 1, 4, 5)
    gp = gradient_penalty(critic, real, fake)  # random alpha: irrelevant for a linear critic
    norm = w.norm()
    assert gp.item() == pytest.approx(((norm - 1) ** 2).item(), rel=1e-5)
    # create_graph=True: the penalty trains the critic. d/dw (||w||-1)² = 2(||w||-1) w/||w||.
    gp.backward()
    assert torch.allclose(critic.w.grad, 2 * (norm - 1) * w / norm, atol=1e-6)


def test_gradient_penalty_is_per_sample_not_per_batch():
    torch.manual_seed(1)
    real, fake = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    alpha = torch.tensor([0.0, 0.25, 0.5, 1.0])
    k = 0.3
    gp = gradient_penalty(Quadratic(k), real, fake, alpha=alpha)
    x_hat = alpha.view(4, 1, 1, 1) * real + (1 - alpha.view(4, 1, 1, 1)) * fake
    per_sample = k * x_hat.flatten(1).norm(dim=1)
    expected = ((per_sample - 1) ** 2).mean()
    batch_norm = ((k * x_hat.norm() - 1) ** 2).item()
    assert gp.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(gp.item() - batch_norm) > 0.1  # the batch-wide norm would be a different penalty


def test_gradient_penalty_does_not_train_the_generator():
    real = torch.rand(2, 1, 8, 8)
    fake = torch.rand(2, 1, 8, 8, requires_grad=True)
    gradient_penalty(Quadratic(1.0), real, fake * 1.0).backward()
    assert fake.grad is None


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


def test_perceptual_random_is_seeded_and_frozen(empty_torch_home):
    torch.manual_seed(123)
    a = PerceptualLoss(layer=3, weights="random", seed=7)
    torch.manual_seed(456)  # the caller's RNG state must not matter
    b = PerceptualLoss(layer=3, weights="random", seed=7)
    c = PerceptualLoss(layer=3, weights="random", seed=8)
    assert a.weights_source == "random(seed=7)"
    assert torch.equal(a.features[0].weight, b.features[0].weight)
    assert not torch.equal(a.features[0].weight, c.features[0].weight)
    assert not any(p.requires_grad for p in a.parameters())
    a.train()
    assert not a.features.training
    x = torch.rand(2, 1, 16, 16, requires_grad=True)
    y = torch.rand(2, 1, 16, 16)
    assert a(y, y).item() == 0.0
    loss = a(x, y)
    loss.backward()
    assert loss.item() > 0 and x.grad.abs().sum() > 0


def test_perceptual_auto_without_cache_is_random(empty_torch_home):
    loss = PerceptualLoss(layer=1, weights="auto", seed=3)
    assert loss.weights_source == "random(seed=3)"


def test_perceptual_imagenet_missing_names_the_path(empty_torch_home):
    expected = cached_imagenet_file("vgg19")
    assert expected == empty_torch_home / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    with pytest.raises(FileNotFoundError, match="vgg19-dcbb9e9d.pth"):
        PerceptualLoss(layer=3, weights="imagenet")


def _save_features(path, layer: int, seed: int) -> PerceptualLoss:
    ref = PerceptualLoss(layer=layer, weights="random", seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    # torchvision's file has "features.N.*" (and classifier) keys; only the used layers matter.
    torch.save({f"features.{k}": v for k, v in ref.features.state_dict().items()}, path)
    return ref


def test_perceptual_auto_and_imagenet_use_the_cached_file(empty_torch_home):
    ref = _save_features(cached_imagenet_file("vgg19"), layer=3, seed=11)
    for weights in ("auto", "imagenet"):
        loss = PerceptualLoss(layer=3, weights=weights, seed=0)
        assert loss.weights_source == f"imagenet:{cached_imagenet_file('vgg19')}"
        assert torch.equal(loss.features[2].weight, ref.features[2].weight)


def test_perceptual_from_file_and_errors(tmp_path):
    path = tmp_path / "vgg.pth"
    ref = _save_features(path, layer=3, seed=5)
    loss = PerceptualLoss(layer=3, weights=str(path))
    assert loss.weights_source == f"file:{path.resolve()}"
    assert torch.equal(loss.features[0].weight, ref.features[0].weight)
    with pytest.raises(ValueError, match="does not fit"):
        PerceptualLoss(layer=8, weights=str(path))  # the file lacks conv2_x
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        PerceptualLoss(layer=3, weights=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="out of range"):
        PerceptualLoss(layer=99, weights="random")


def test_perceptual_auto_falling_back_to_random_warns(empty_torch_home, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="ldct"):
        loss = PerceptualLoss(layer=1, weights="auto", seed=3)
    assert loss.random_weights
    assert "perceptual: random weights; λ₃ is not the paper's" in caplog.text
    assert "vgg19-dcbb9e9d.pth" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldct"):
        PerceptualLoss(layer=1, weights="random", seed=3)  # asked for explicitly: no warning
    assert not caplog.text


def test_perceptual_refuses_random_when_real_weights_are_required(empty_torch_home):
    for weights in ("auto", "random"):
        with pytest.raises(FileNotFoundError, match="allow_random_perceptual=false"):
            PerceptualLoss(layer=1, weights=weights, allow_random=False)
    _save_features(cached_imagenet_file("vgg19"), layer=1, seed=1)
    assert not PerceptualLoss(layer=1, weights="auto", allow_random=False).random_weights


def test_paper_profile_refuses_a_random_perceptual_network(empty_torch_home):
    from ldct.config import load_config
    from ldct.training.engine import build_networks

    # Small encoder, no encoder weights: only the perceptual network is at issue here.
    cfg = load_config(
        "paper",
        ["loss.perceptual_weights=auto", "model.encoder=resnet10t", "model.encoder_weights=none"],
    )
    with pytest.raises(FileNotFoundError, match="random vgg19"):
        build_networks(cfg, "cpu")


def test_perceptual_sees_the_abdomen_window():
    from ldct.config import HUNormalization

    norm = HUNormalization()
    loss = PerceptualLoss(layer=3, weights="random", seed=0, normalization=norm)
    torch.manual_seed(0)
    base = torch.full((1, 1, 32, 32), 40.0)
    base[..., 8:24, 8:24] = 500.0  # bone
    other = base.clone()
    other[..., 8:24, 8:24] = 1500.0  # brighter bone: both clip to the window's top
    a, b = norm.to_unit(base), norm.to_unit(other)
    assert loss(a, b).item() == 0.0
    # 20 HU of noise in soft tissue: visible in the window, ~10x stronger than over [-1024, 3072].
    noisy = norm.to_unit(base + 20.0 * torch.randn_like(base))
    windowed = loss(noisy, a).item()
    full_range = PerceptualLoss(layer=3, weights="random", seed=0, window_hu=(-1024.0, 3072.0))
    assert windowed > 10 * full_range(noisy, a).item() > 0
