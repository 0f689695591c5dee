"""Generator: a timm encoder (EfficientNetV2-M by default) and a top-down decoder, residual output.

Shapes for the default ``tf_efficientnetv2_m`` with ``out_indices=(2, 3, 4)`` and a 64x64 patch:

    x [N,1,64,64] --encoder--> blocks.2 [N,80,8,8]  (stride 8,  the paper's stage 3)
                               blocks.4 [N,176,4,4] (stride 16, stage 5)
                               blocks.6 [N,512,2,2] (stride 32, stage 7)
    top-down fusion (1x1 laterals to D channels, upsample + add + 2 convs per level)
        --> [N,D,8,8] --3 x (upsample 2x, 2 convs)--> [N,max(D/8,16),64,64]
    concat a shallow full-resolution path on x (2 convs) [N,max(D/4,16),64,64]
    --> conv --> zero-initialised conv --> residual [N,1,64,64];  output = x + residual

The last convolution starts at zero, so an untrained generator is the identity and training
starts from the LDCT baseline instead of from noise. Only ``nn.Module``s and builders live here
(no optimizers, devices or logging).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldct.config import HUNormalization
from ldct.models.standardize import Standardize

# The generator's input standardisation (ldct.models.standardize) before these buffers existed:
# (x - 0.25) / 0.05, whatever the normalisation. Old state_dicts load with it.
_LEGACY_STANDARDIZATION = (0.25, 0.05)

# Files a timm model page holds on the Hugging Face hub, in the order timm prefers them.
_HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")


class WeightsNotFoundError(FileNotFoundError):
    """Requested encoder weights are not on this machine (nothing is ever downloaded)."""


def _conv_act(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(0.2, inplace=True))


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(_conv_act(cin, cout), _conv_act(cout, cout))


def _cached_encoder_file(encoder: str) -> tuple[Path | None, list[str]]:
    """Look for an encoder's ImageNet weights in the local caches only; never touch the network.

    Returns the file (or None) and the places looked at, for the error message.
    """
    import timm  # lazy: `import ldct.models` must not pay for timm

    cfg = timm.models.get_pretrained_cfg(encoder)
    if cfg is None:
        return None, [f"timm has no pretrained config for {encoder!r}"]
    looked: list[str] = []
    hf_id = getattr(cfg, "hf_hub_id", None)
    if hf_id:
        from huggingface_hub import constants, try_to_load_from_cache

        filenames = (cfg.hf_hub_filename,) if getattr(cfg, "hf_hub_filename", None) else _HF_FILENAMES
        for filename in filenames:
            # try_to_load_from_cache only reads the local cache directory (offline by design).
            found = try_to_load_from_cache(hf_id, filename)
            looked.append(
                f"{constants.HF_HUB_CACHE}/models--{hf_id.replace('/', '--')}/snapshots/*/{filename}"
            )
            if isinstance(found, str) and Path(found).is_file():
                return Path(found), looked
    url = getattr(cfg, "url", None)
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        looked.append(str(path))
        if path.is_file():
            return path, looked
    return None, looked


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    # Accept the usual wrappers ({"state_dict": ...}, {"model": ...}).
    for key in ("state_dict", "model", "encoder"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state_dict (dict of tensors), got {type(obj).__name__}")
    return obj


def load_encoder_state(encoder: nn.Module, path: str | Path, first_conv: str | None) -> None:
    """Load a state_dict file into a features-only timm encoder.

    Accepts a full classification checkpoint (head keys are ignored) or an encoder-only one,
    optionally prefixed with ``module.`` or ``encoder.``. A 3-channel stem is summed over its
    input channels into the 1-channel stem (timm's ``adapt_input_conv``). Missing encoder keys
    or mismatched shapes raise ValueError naming them.
    """
    import timm  # lazy: `import ldct.models` must not pay for timm

    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"encoder weights file {path} does not exist")
    state = _read_state_dict(path)
    for prefix in ("module.", "encoder."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    own = encoder.state_dict()
    if first_conv is not None:
        key = f"{first_conv}.weight"
        if key in state and key in own and state[key].shape[1] != own[key].shape[1]:
            state[key] = timm.models.adapt_input_conv(own[key].shape[1], state[key])
    missing = [k for k in own if k not in state]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or wrong:
        details = []
        if missing:
            details.append(f"{len(missing)} missing keys (first: {', '.join(missing[:5])})")
        if wrong:
            details.append(f"{len(wrong)} shape mismatches (first: {'; '.join(wrong[:3])})")
        raise ValueError(
            f"{path} does not fit the encoder: {'; '.join(details)}. Give a state_dict of the same "
            "timm architecture (a classification checkpoint or an encoder-only one)."
        )
    encoder.load_state_dict({k: state[k] for k in own}, strict=True)


class Generator(nn.Module):
    """timm encoder + top-down decoder predicting a residual: ``forward(x) = x + residual(x)``.

    ``x`` is [N,1,H,W] in [0,1] (HU scaled by the config's normalisation, which also sets the
    ``standardize`` buffers); any H, W works: the input is reflect-padded to a multiple of the
    encoder's largest reduction and cropped back.
    """

    def __init__(
        self,
        encoder: str = "tf_efficientnetv2_m",
        out_indices: tuple[int, ...] = (2, 3, 4),
        decoder_channels: int = 64,
        encoder_weights: str = "none",
        normalization: HUNormalization | None = None,
    ) -> None:
        super().__init__()
        # [0,1] input -> CT-scaled z; buffers travel with the state_dict (export, denoise).
        self.standardize = Standardize(normalization, legacy=_LEGACY_STANDARDIZATION)
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices:
            raise ValueError("out_indices must name at least one encoder feature level")
        if decoder_channels < 8:
            raise ValueError(f"decoder_channels must be >= 8, got {decoder_channels}")
        self.encoder_name = encoder
        self.encoder_weights_source = "none"
        self.encoder = self._build_encoder(encoder, out_indices, encoder_weights)

        info = self.encoder.feature_info
        self.feature_channels: tuple[int, ...] = tuple(info.channels())
        self.feature_reductions: tuple[int, ...] = tuple(info.reduction())
        self.feature_modules: tuple[str, ...] = tuple(info.module_name())
        if list(self.feature_reductions) != sorted(self.feature_reductions):
            raise ValueError(f"out_indices {out_indices} must go from shallow to deep")
        # Padding unit: the deepest feature map must have an integer size.
        self.pad_multiple = max(self.feature_reductions)

        d = decoder_channels
        # 1x1 lateral projections bring every level to the decoder width.
        self.laterals = nn.ModuleList(nn.Conv2d(c, d, 1) for c in self.feature_channels)
        # One fusion block per shallower level, applied after upsample + add.
        self.fuse = nn.ModuleList(_conv_block(d, d) for _ in self.feature_channels[:-1])

        # From the shallowest feature level up to full resolution, halving channels (>= 16).
        r0 = self.feature_reductions[0]
        steps = int(round(math.log2(r0)))
        if 2**steps != r0:
            raise ValueError(f"shallowest reduction {r0} is not a power of two")
        widths = [max(d // 2 ** (k + 1), 16) for k in range(steps)]
        self.up_blocks = nn.ModuleList()
        cin = d
        for w in widths:
            self.up_blocks.append(_conv_block(cin, w))
            cin = w

        # Shallow full-resolution path on the input: keeps the finest detail the encoder's first
        # stride would lose.
        ws = max(d // 4, 16)
        self.shallow = _conv_block(1, ws)
        self.head = _conv_act(cin + ws, ws)
        self.out = nn.Conv2d(ws, 1, 3, padding=1)
        # Zero init: residual == 0, so the untrained generator is exactly the identity.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _build_encoder(self, name: str, out_indices: tuple[int, ...], weights: str) -> nn.Module:
        import timm  # lazy: `import ldct.models` must not pay for timm

        kwargs: dict[str, Any] = dict(features_only=True, out_indices=out_indices, in_chans=1)
        if weights == "none":
            return timm.create_model(name, pretrained=False, **kwargs)
        if weights == "imagenet":
            path, looked = _cached_encoder_file(name)
            if path is None:
                cfg = timm.models.get_pretrained_cfg(name)
                hf_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
                how = (
                    f"`hf download {hf_id}` on a machine with internet and copy the Hugging Face cache "
                    "(HF_HOME) here, or "
                    if hf_id
                    else ""
                )
                raise WeightsNotFoundError(
                    f"ImageNet weights for encoder {name!r} are not on disk (nothing is downloaded). "
                    f"Looked in: {'; '.join(looked)}. To fix: {how}put the checkpoint file at one of the "
                    "paths above, or pass its path as model.encoder_weights=/path/to/file, or use "
                    "model.encoder_weights=none."
                )
            # Loading through timm with a `file` override applies the model's checkpoint filter
            # and the 3->1 channel stem adaptation; no hub access happens for a file source.
            model = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs
            )
            self.encoder_weights_source = f"imagenet:{path}"
            return model
        model = timm.create_model(name, pretrained=False, **kwargs)
        first_conv = model.pretrained_cfg.get("first_conv") if model.pretrained_cfg else None
        load_encoder_state(model, weights, first_conv)
        self.encoder_weights_source = f"file:{Path(weights).resolve()}"
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"Generator expects [N,1,H,W], got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        m = self.pad_multiple
        ph, pw = (-h) % m, (-w) % m
        # Always pad (possibly by 0): no shape-dependent branch for a tracer to bake in, so a
        # model traced at 512x512 still pads a 500x500 input. Reflect needs pad < size; tiny
        # inputs fall back to edge replication.
        mode = "reflect" if ph < h and pw < w else "replicate"
        xp = F.pad(x, (0, pw, 0, ph), mode=mode)

        xs = self.standardize(xp)
        feats = self.encoder(xs)
        y = self.laterals[-1](feats[-1])
        for i in range(len(feats) - 2, -1, -1):
            lateral = self.laterals[i](feats[i])
            y = F.interpolate(y, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            y = self.fuse[i](y + lateral)
        for block in self.up_blocks:
            y = block(F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False))
        y = self.head(torch.cat([y, self.shallow(xs)], dim=1))
        residual = self.out(y)
        return x + residual[..., :h, :w]


def build_generator(model_cfg: Any, normalization: HUNormalization | None = None) -> Generator:
    """Generator from a ``ModelConfig`` (encoder, out_indices, decoder_channels, encoder_weights)
    and the run's HU normalisation (it sets the input standardisation buffers)."""
    return Generator(
        encoder=model_cfg.encoder,
        out_indices=tuple(model_cfg.out_indices),
        decoder_channels=model_cfg.decoder_channels,
        encoder_weights=model_cfg.encoder_weights,
        normalization=normalization,
    )
