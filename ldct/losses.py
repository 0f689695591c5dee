"""Loss terms: Wasserstein critic/generator terms, the per-sample gradient penalty, L1, perceptual.

The generator objective (docs/DESIGN.md §4, WGAN-VGG): ``λ_adv·adv + λ₂·L1 + λ₃·perceptual``; the critic
objective: ``E[D(fake)] - E[D(real)] + λ_gp·GP``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldct.config import HUNormalization

logger = logging.getLogger("ldct")

# What VGG sees (docs/DESIGN.md §4): the abdomen window, where quarter-dose noise is visible.
PERCEPTUAL_WINDOW_HU = (-160.0, 240.0)
# The warning and report line for a random perceptual network.
RANDOM_PERCEPTUAL_NOTE = "perceptual: random weights; λ₃ is not the paper's"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def critic_wasserstein(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """Critic loss without the penalty: ``fake.mean() - real.mean()`` (minimised by the critic)."""
    return fake_scores.mean() - real_scores.mean()


def generator_adversarial(fake_scores: torch.Tensor) -> torch.Tensor:
    """Generator's adversarial loss: ``-fake.mean()``."""
    return -fake_scores.mean()


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error (in the network's [0,1] units)."""
    return F.l1_loss(pred, target)


def gradient_penalty(
    critic: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """WGAN-GP penalty ``mean_i (||∇_x D(x̂_i)||₂ - 1)²`` with ``x̂_i = α_i·real_i + (1-α_i)·fake_i``.

    The norm is per sample, over all of a sample's pixels (``grad.flatten(1).norm(2, dim=1)``),
    not over the batch. ``alpha`` ([N] or [N,1,1,1], default uniform random per sample) exists
    for tests. The graph is kept (``create_graph=True``) so the penalty trains the critic.
    """
    n = real.shape[0]
    if alpha is None:
        alpha = torch.rand(n, 1, 1, 1, device=real.device, dtype=real.dtype)
    alpha = alpha.reshape(n, *([1] * (real.ndim - 1))).to(real)
    # fake is detached: the penalty trains the critic only, never the generator.
    x_hat = (alpha * real.detach() + (1.0 - alpha) * fake.detach()).requires_grad_(True)
    scores = critic(x_hat)
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    norm = grad.flatten(1).norm(2, dim=1)
    return ((norm - 1.0) ** 2).mean()


# torchvision's VGG layer plans (torchvision.models.vgg.cfgs) by model name, without batch norm.
_VGG_CFGS = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}


def _vgg_features(net: str, layer: int, seed: int) -> nn.Sequential:
    """``vgg.features[:layer+1]`` initialised like torchvision's VGG, from ``seed`` only.

    Only the feature layers are built: the classifier (~120M parameters) would cost seconds and
    half a gigabyte for nothing. A private RNG keeps the caller's stream untouched, so every
    process (every DDP rank) gets the same random weights for a seed.
    """
    from torchvision.models.vgg import cfgs, make_layers

    all_layers = make_layers(cfgs[_VGG_CFGS[net]], batch_norm=False)
    if not 0 <= layer < len(all_layers):
        raise ValueError(f"perceptual layer {layer} out of range for {net} (0..{len(all_layers) - 1})")
    features = all_layers[: layer + 1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
    return features


def _weights_enum(net: str):
    # Lazy: importing torchvision costs ~1.7 s here (it loads torch._dynamo), and every process
    # that imports the engine (each Tune trial's actor, each CLI) would pay it for nothing.
    import torchvision

    try:
        return torchvision.models.get_model_weights(net).IMAGENET1K_V1
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"perceptual net {net!r} is not a torchvision VGG (use vgg19 or vgg16)") from exc


def cached_imagenet_file(net: str = "vgg19") -> Path:
    """Where torchvision's ImageNet file for ``net`` lives in the torch hub cache (may not exist)."""
    url = _weights_enum(net).url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


class PerceptualLoss(nn.Module):
    """MSE between frozen VGG features (``.features[:layer+1]``) of prediction and target.

    Inputs are [N,1,H,W] in the network's [0,1] units (``normalization``). VGG sees the abdomen
    window: HU clipped to [-160, 240] and mapped to [0, 1], repeated to 3 channels, then the
    ImageNet mean/std. Over the full [-1024, 3072] range quarter-dose noise spans ~1 % of VGG's
    input range and its features barely react to it; in the window they see what a reader sees.
    Pixels outside the window get no perceptual gradient (the L1 term still covers them). ``layer`` indexes torchvision's ``.features`` (35 = relu5_4 as in
    WGAN-VGG, 8 = relu2_2 is much cheaper on CPU). ``weights``:

    - ``"auto"``: torchvision's ImageNet file if it is in the torch hub cache, else a seeded
      random init, with a warning (``RANDOM_PERCEPTUAL_NOTE``): a random relu1_2 is a fixed random
      filter bank, so λ₃ tuned with it says nothing about the paper's λ₃;
    - ``"imagenet"``: the cached file, or FileNotFoundError naming the expected path;
    - ``"random"``: seeded random init, identical in every process for a seed;
    - any other string: a path to a state_dict file (a full VGG one or ``.features`` only).

    ``allow_random=False`` refuses "random" and an "auto" that would fall back to it (the paper
    profile). ``random_weights`` is True when the network is random. ``weights_source`` says
    which was used, e.g. ``"imagenet:/root/.cache/torch/hub/checkpoints/
    vgg19-dcbb9e9d.pth"``, ``"file:/p.pth"`` or ``"random(seed=0)"``.
    """

    def __init__(
        self,
        net: str = "vgg19",
        layer: int = 35,
        weights: str = "auto",
        seed: int = 0,
        normalization: HUNormalization | None = None,
        window_hu: tuple[float, float] = PERCEPTUAL_WINDOW_HU,
        allow_random: bool = True,
    ) -> None:
        super().__init__()
        if net not in _VGG_CFGS:
            raise ValueError(f"perceptual net {net!r} is not supported (use one of {sorted(_VGG_CFGS)})")
        cached = cached_imagenet_file(net)
        requested = weights
        if weights == "auto":
            weights = "imagenet" if cached.is_file() else "random"
        if weights == "random" and not allow_random:
            raise FileNotFoundError(
                f"loss.perceptual_weights={requested!r} would use a random {net}, and this profile "
                f"requires real weights (loss.allow_random_perceptual=false): λ₃ tuned against a "
                f"random network is not the paper's. Put torchvision's {cached.name} at {cached} "
                "(TORCH_HOME sets the cache root) or pass a state_dict path."
            )
        if requested == "auto" and weights == "random":
            logger.warning(
                "%s (loss.perceptual_weights=auto found no %s at %s; using random(seed=%d))",
                RANDOM_PERCEPTUAL_NOTE,
                cached.name,
                cached,
                seed,
            )
        if weights == "imagenet" and not cached.is_file():
            raise FileNotFoundError(
                f"perceptual.weights=imagenet but {cached} does not exist (nothing is downloaded). "
                f"Copy torchvision's {cached.name} there (TORCH_HOME sets the cache root), pass a "
                "state_dict path, or use loss.perceptual_weights=random."
            )
        features = _vgg_features(net, layer, seed)
        if weights == "imagenet":
            self._load(features, cached)
            self.weights_source = f"imagenet:{cached}"
        elif weights == "random":
            self.weights_source = f"random(seed={seed})"
        else:
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError(
                    f"perceptual weights file {path} does not exist (expected 'auto', 'imagenet', "
                    "'random' or a state_dict path)"
                )
            self._load(features, path)
            self.weights_source = f"file:{path.resolve()}"
        self.features = features.eval()
        for p in self.features.parameters():
            p.requires_grad_(False)
        self.net, self.layer = net, layer
        self.random_weights = weights == "random"
        norm = normalization or HUNormalization()
        lo, hi = (float(v) for v in window_hu)
        if not hi > lo:
            raise ValueError(f"perceptual window must have high > low HU, got {window_hu}")
        # unit x -> HU = x*span + hu_min -> window (HU - lo)/(hi - lo) = x*gain + offset
        span = float(norm.hu_max) - float(norm.hu_min)
        self.window_hu = (lo, hi)
        self.register_buffer("window_gain", torch.tensor(span / (hi - lo)), persistent=False)
        self.register_buffer(
            "window_offset", torch.tensor((float(norm.hu_min) - lo) / (hi - lo)), persistent=False
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def _load(features: nn.Sequential, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if any(k.startswith("features.") for k in state):
            state = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        own = features.state_dict()
        missing = [k for k in own if k not in state]
        wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
        if missing or wrong:
            raise ValueError(
                f"{path} does not fit VGG .features[:{len(features)}]: missing {missing[:5]}, "
                f"shape mismatch {wrong[:5]}"
            )
        features.load_state_dict({k: state[k] for k in own})

    def train(self, mode: bool = True) -> PerceptualLoss:
        # Frozen feature extractor: always in eval mode, whatever the caller does.
        super().train(mode)
        self.features.eval()
        return self

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        windowed = (x * self.window_gain + self.window_offset).clamp(0.0, 1.0)
        x = (windowed.expand(-1, 3, -1, -1) - self.mean) / self.std
        return self.features(x)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_features = self._embed(target)
        return F.mse_loss(self._embed(pred), target_features)
