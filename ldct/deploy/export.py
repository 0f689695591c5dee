"""ONNX + TorchScript export of a generator with a parity check, and the loader for the result.

Layout of an export directory (DESIGN.md §5)::

    model.onnx        dynamic batch/height/width, float32 [N,1,H,W] in [0,1] -> same
    model.pt          TorchScript (torch.jit.load; needs neither ldct nor timm)
    model.xml/.bin    OpenVINO IR converted from model.onnx (dynamic N/H/W, fp32 weights)
    model_card.json   where the model came from, what it scored, how to feed it

Why the export is split in two. The generator pads H, W up to a multiple of its deepest stride
(``pad_multiple``), runs, and crops back. Exporting that with fully symbolic H, W fails: the
Python ``if`` on the pad amount becomes a guard that does not hold for all sizes, and timm's
TF-"SAME" convolutions (``Conv2dSame``, computing ``ceil(x / stride)`` at run time) grow nested
symbolic expressions whose solving took minutes. So the *core* is exported for H, W that are
multiples of ``pad_multiple`` (``torch.export`` with ``Dim * pad_multiple``); there every pad
is a constant, the Python branch is decided once, and timm's ``Conv2dSame`` can be replaced by
an equivalent static-pad convolution (checked on a probe input). The pad-to-multiple (reflect)
and the crop back are then added around the core: as ONNX ``Pad``/``Slice`` nodes in
model.onnx, and as a scripted wrapper around the traced core in model.pt.

All three are checked against eager PyTorch on a real CT slice (pydicom's CT_small by
default) and on batches of other sizes; more than 1 HU after de-normalisation raises
:class:`ExportParityError` and nothing is written.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldct.config import HUNormalization

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.pt"
OPENVINO_FILE = "model.xml"
OPENVINO_WEIGHTS = "model.bin"
CARD_FILE = "model_card.json"
CARD_FORMAT = 1
PARITY_TOLERANCE_HU = 1.0
INPUT_NAME = "input"
OUTPUT_NAME = "output"
BACKENDS = ("onnxruntime", "torch", "openvino")  # the CPU runners an export directory feeds


class ExportParityError(RuntimeError):
    """An exported file disagrees with eager PyTorch by more than the tolerance (in HU)."""


class ExportError(RuntimeError):
    """The generator cannot be exported as it is (the message says why and what to do)."""


# --------------------------------------------------------------------------------------------
# Normalisation and the reference slice


def normalization_from_meta(meta: dict[str, Any]) -> HUNormalization:
    """The HU window a bundle's meta (or a model card) carries; missing is an error, never a default."""
    norm = meta.get("normalization")
    if isinstance(norm, dict) and "hu_min" in norm and "hu_max" in norm:
        return HUNormalization(hu_min=float(norm["hu_min"]), hu_max=float(norm["hu_max"]))
    config = meta.get("config") or {}
    if "normalization.hu_min" in config and "normalization.hu_max" in config:
        return HUNormalization(float(config["normalization.hu_min"]), float(config["normalization.hu_max"]))
    raise ValueError(
        "the model's meta has no HU normalisation ('normalization': {'hu_min', 'hu_max'} or "
        "config keys normalization.hu_min/hu_max); it must travel with the model, it is not guessed"
    )


def reference_slice() -> tuple[np.ndarray, str]:
    """pydicom's bundled CT_small.dcm in HU (float32 [128,128]) and its description."""
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    if path is None:
        raise FileNotFoundError("pydicom's test file CT_small.dcm is not available; pass reference_slice_hu")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return hu, "pydicom CT_small.dcm"


# --------------------------------------------------------------------------------------------
# Preparing the exportable core


class _StaticSameConv2d(nn.Module):
    """timm ``Conv2dSame`` with its TF-"SAME" padding fixed for inputs divisible by the stride.

    For x % stride == 0 the SAME padding total is ``max((k - 1) * d + 1 - s, 0)`` whatever x is,
    so inside the core (H, W multiples of ``pad_multiple``) this is exactly the dynamic version.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        pads = []
        for k, s, d in zip(conv.kernel_size, conv.stride, conv.dilation, strict=True):
            total = max((k - 1) * d + 1 - s, 0)
            pads.append((total // 2, total - total // 2))
        self.pad = (pads[1][0], pads[1][1], pads[0][0], pads[0][1])  # F.pad order: W then H

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return F.conv2d(F.pad(x, self.pad), c.weight, c.bias, c.stride, 0, c.dilation, c.groups)


def _dynamic_same_convs(module: nn.Module) -> list[tuple[str, nn.Module]]:
    # A module built from timm means timm is already imported; never import it just to look.
    layers = sys.modules.get("timm.layers")
    conv2d_same = getattr(layers, "Conv2dSame", None)
    if conv2d_same is None:
        return []
    return [(name, m) for name, m in module.named_modules() if isinstance(m, conv2d_same)]


def _exportable_core(generator: nn.Module, multiple: int) -> tuple[nn.Module, int]:
    """A CPU fp32 eval copy with timm's dynamic SAME convs made static; returns (core, replaced).

    A probe forward at 3 * multiple (an odd multiple, so no extra factor of two hides a problem)
    checks that every replaced convolution sees sizes divisible by its stride; otherwise the
    replacement would not be exact and ExportError is raised.
    """
    core = copy.deepcopy(generator).float().cpu().eval()
    convs = _dynamic_same_convs(core)
    if not convs:
        return core, 0
    seen: dict[str, tuple[int, int]] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, args, name=name: seen.__setitem__(name, tuple(args[0].shape[-2:]))
        )
        for name, m in convs
    ]
    try:
        with torch.inference_mode():
            core(torch.rand(1, 1, 3 * multiple, 3 * multiple))
    finally:
        for h in hooks:
            h.remove()
    for name, conv in convs:
        size = seen.get(name)
        if size is not None and any(x % s for x, s in zip(size, conv.stride, strict=True)):
            raise ExportError(
                f"timm SAME-padded convolution {name} (stride {conv.stride}) sees size {size} at an input of "
                f"{3 * multiple}x{3 * multiple}: its padding is not constant over multiples of {multiple}. "
                "Give the generator a pad_multiple that is a multiple of its total stride."
            )
    for name, conv in convs:
        parent_name, _, child = name.rpartition(".")
        parent = core.get_submodule(parent_name) if parent_name else core
        setattr(parent, child, _StaticSameConv2d(conv))
    return core, len(convs)


def _pad_multiple(generator: nn.Module) -> int:
    """The generator's padding unit (``pad_multiple``, e.g. 32 for EfficientNetV2); 1 if it has none."""
    multiple = getattr(generator, "pad_multiple", None)
    if multiple is None:
        multiple = getattr(generator, "stride", 1)
    multiple = int(multiple)
    if multiple < 1:
        raise ExportError(f"generator pad_multiple must be >= 1, got {multiple}")
    return multiple


# --------------------------------------------------------------------------------------------
# ONNX


def _export_core_onnx(core: nn.Module, multiple: int) -> Any:
    """torch.onnx (dynamo) export of the core for [N,1,k*m,l*m] inputs; returns the ModelProto."""
    side = 2 * multiple if multiple > 1 else 64
    example = torch.rand(2, 1, side, side)  # batch 2: a size of 1 would be specialised to 1
    batch = torch.export.Dim("batch", min=1, max=4096)
    if multiple > 1:
        hk = torch.export.Dim("height_blocks", min=1, max=max(2, 16384 // multiple))
        wk = torch.export.Dim("width_blocks", min=1, max=max(2, 16384 // multiple))
        height, width = multiple * hk, multiple * wk
    else:
        # A network of unpadded convolutions (RED-CNN) names the smallest side it exports for.
        low = max(2, int(getattr(core, "export_min_size", 2)))
        height, width = (
            torch.export.Dim("height", min=low, max=16384),
            torch.export.Dim("width", min=low, max=16384),
        )
    names = list(inspect.signature(core.forward).parameters)
    shapes = {names[0]: {0: batch, 2: height, 3: width}}
    try:
        program = torch.export.export(core, (example,), dynamic_shapes=shapes, strict=False)
    except Exception as exc:
        raise ExportError(
            f"torch.export could not capture {type(core).__name__} with dynamic batch/height/width "
            f"(H, W multiples of {multiple}): {type(exc).__name__}: {str(exc)[:2000]}"
        ) from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            program,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            optimize=True,
        )
    return onnx_program.model_proto


def _wrap_pad_crop(proto: Any, multiple: int) -> Any:
    """Add reflect-pad-to-multiple before and crop-back after the core graph (in place)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    core_in, core_out = f"{INPUT_NAME}__padded", f"{OUTPUT_NAME}__padded"
    for node in graph.node:
        node.input[:] = [core_in if n == INPUT_NAME else n for n in node.input]
        node.output[:] = [core_out if n == OUTPUT_NAME else n for n in node.output]
    kept = [vi for vi in graph.value_info if vi.name not in (INPUT_NAME, OUTPUT_NAME)]
    del graph.value_info[:]
    graph.value_info.extend(kept)

    def const(name: str, values: list[int]) -> Any:
        return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)

    graph.initializer.extend(
        [
            const("pc__hw_start", [2]),
            const("pc__hw_end", [4]),
            const("pc__multiple", [multiple]),
            const("pc__zeros6", [0, 0, 0, 0, 0, 0]),
            const("pc__axes_hw", [2, 3]),
            const("pc__starts_hw", [0, 0]),
        ]
    )
    # pad = (m - hw % m) % m, all non-negative, so ONNX Mod's sign convention does not matter.
    # ONNX pads: [n_begin, c_begin, h_begin, w_begin, n_end, c_end, h_end, w_end].
    pre = [
        helper.make_node("Shape", [INPUT_NAME], ["pc__shape"]),
        helper.make_node("Slice", ["pc__shape", "pc__hw_start", "pc__hw_end"], ["pc__hw"]),
        helper.make_node("Mod", ["pc__hw", "pc__multiple"], ["pc__rem"]),
        helper.make_node("Sub", ["pc__multiple", "pc__rem"], ["pc__gap"]),
        helper.make_node("Mod", ["pc__gap", "pc__multiple"], ["pc__pad_hw"]),
        helper.make_node("Concat", ["pc__zeros6", "pc__pad_hw"], ["pc__pads"], axis=0),
        helper.make_node("Pad", [INPUT_NAME, "pc__pads"], [core_in], mode="reflect"),
    ]
    post = [helper.make_node("Slice", [core_out, "pc__starts_hw", "pc__hw", "pc__axes_hw"], [OUTPUT_NAME])]
    nodes = pre + list(graph.node) + post
    del graph.node[:]
    graph.node.extend(nodes)

    dims = ["batch", 1, "height", "width"]
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, dims))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, dims))
    onnx.checker.check_model(proto)
    return proto


def _rename_dims(proto: Any) -> Any:
    """Name the core's dynamic dims (used when there is no pad/crop wrapper)."""
    from onnx import TensorProto, helper

    graph = proto.graph
    dims = ["batch", 1, "height", "width"]
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, dims))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, dims))
    return proto


def export_onnx(generator: nn.Module, path: str | Path) -> dict[str, Any]:
    """Write only the ONNX model of ``generator`` (same graph as in a bundle, no parity check).

    For benchmarks and experiments; deployment uses :func:`export_bundle`. Returns
    ``{"path", "pad_multiple", "timm_same_convs_made_static", "opset"}``.
    """
    import onnx

    eager = copy.deepcopy(getattr(generator, "module", generator)).float().cpu().eval()
    multiple = _pad_multiple(eager)
    core, replaced = _exportable_core(eager, multiple)
    proto = _export_core_onnx(core, multiple)
    proto = _wrap_pad_crop(proto, multiple) if multiple > 1 else _rename_dims(proto)
    onnx.save_model(proto, str(path))
    return {
        "path": str(path),
        "pad_multiple": multiple,
        "timm_same_convs_made_static": replaced,
        "opset": max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None),
    }


# --------------------------------------------------------------------------------------------
# TorchScript


class _PadCrop(nn.Module):
    """Reflect-pad [N,1,H,W] to multiples of ``multiple``, run the traced core, crop back."""

    def __init__(self, core: nn.Module, multiple: int) -> None:
        super().__init__()
        self.core = core
        self.multiple = multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        w = x.shape[3]
        ph = (self.multiple - h % self.multiple) % self.multiple
        pw = (self.multiple - w % self.multiple) % self.multiple
        if ph > 0 or pw > 0:
            # Same rule as the generator: reflect needs pad < size, tiny inputs replicate.
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, [0, pw, 0, ph], mode=mode)
        return self.core(x)[:, :, :h, :w]


def _torchscript(core: nn.Module, multiple: int) -> torch.jit.ScriptModule:
    example = torch.rand(2, 1, 2 * multiple, 2 * multiple) if multiple > 1 else torch.rand(2, 1, 64, 64)
    with warnings.catch_warnings():
        # Tracer warnings about shape-derived Python values: exact here because the core only
        # ever sees multiples of pad_multiple (checked by the parity runs below).
        warnings.simplefilter("ignore")
        with torch.no_grad():
            traced = torch.jit.trace(core, example, check_trace=False)
        return torch.jit.script(_PadCrop(traced, multiple)).eval()


# --------------------------------------------------------------------------------------------
# Loading an export directory


class ExportedModel:
    """A loaded export directory: ``model(unit [N,1,H,W] float32) -> np.ndarray`` plus ``card``.

    The inference itself is a :mod:`ldct.deploy.backends` runner (``backend`` at ``precision``).
    """

    def __init__(
        self,
        model_dir: str | Path,
        backend: str = "onnxruntime",
        threads: int | None = None,
        precision: str = "fp32",
    ) -> None:
        from ldct.deploy.backends import runner_from_export

        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.model_dir = Path(model_dir)
        card_path = self.model_dir / CARD_FILE
        if not card_path.is_file():
            raise FileNotFoundError(
                f"{card_path} not found: {model_dir} is not an export directory (export_bundle)"
            )
        self.card: dict[str, Any] = json.loads(card_path.read_text())
        self.backend = backend
        self.precision = precision
        self.runner = runner_from_export(self.model_dir, backend, precision, threads)

    def __call__(self, unit: np.ndarray) -> np.ndarray:
        return self.runner(unit)


def load_exported(
    model_dir: str | Path, backend: str = "onnxruntime", precision: str = "fp32"
) -> ExportedModel:
    """Load ``model_dir`` (written by :func:`export_bundle`) for inference with ``backend``."""
    return ExportedModel(model_dir, backend=backend, precision=precision)


# --------------------------------------------------------------------------------------------
# Parity


def _max_hu_error(a: np.ndarray, b: np.ndarray, norm: HUNormalization) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))) * (norm.hu_max - norm.hu_min))


def _check_inputs(ref_hu: np.ndarray, norm: HUNormalization) -> list[tuple[str, np.ndarray]]:
    """The reference slice, plus a batch of 3 crops at a size that needs pad and crop."""
    unit = norm.to_unit(ref_hu.astype(np.float32)).astype(np.float32)
    cases = [("reference", unit[None, None])]
    h, w = unit.shape
    ch, cw = max(2, min(h, 3 * h // 4 + 1)), max(2, min(w, 2 * w // 3 + 3))
    crops = [
        unit[:ch, :cw],
        unit[h - ch :, w - cw :],
        np.ascontiguousarray(unit[:ch, :cw][::-1, ::-1]),
    ]
    cases.append((f"batch3_{ch}x{cw}", np.stack(crops)[:, None].astype(np.float32)))
    return cases


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# The card


def _hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    keys = ("loss.", "optim.", "model.")
    extra = ("train.n_critic", "train.batch_size", "train.iterations", "data.patch_size", "train.seed")
    return {k: v for k, v in config.items() if k.startswith(keys) or k in extra}


def _throughput(meta: dict[str, Any]) -> dict[str, Any] | None:
    if isinstance(meta.get("throughput"), dict):
        return meta["throughput"]
    tags = meta.get("tags") or {}
    found = {
        k: v for k, v in tags.items() if ("fps" in k.lower() or "device" in k.lower()) and k != "fps_gate"
    }
    if meta.get("fps") is not None:
        found.update(
            {"fps": meta["fps"], "device": meta.get("device"), "device_name": meta.get("device_name")}
        )
    return found or None


def _precision_gate(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The gate verdict ``ldct-best validate`` measured for the promoted path (tag ``fps_gate``)."""
    if isinstance(meta.get("precision_gate"), dict):
        return meta["precision_gate"]
    raw = (meta.get("tags") or {}).get("fps_gate")
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return {"unparsed": raw}


def _card(
    generator: nn.Module,
    meta: dict[str, Any],
    norm: HUNormalization,
    multiple: int,
    parity: dict[str, Any],
    files: dict[str, Any],
    replaced: int,
) -> dict[str, Any]:
    import onnx
    import onnxruntime

    import ldct

    config = dict(meta.get("config") or {})
    metrics = meta.get("metrics") or {}
    span = f"({norm.hu_max:g} - ({norm.hu_min:g}))"
    return {
        "card_format": CARD_FORMAT,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "registered_model": meta.get("registered_model") or meta.get("name") or "ldct-denoiser",
        "version": meta.get("version"),
        "run_id": meta.get("run_id"),
        "aliases": meta.get("aliases") or ([meta["alias"]] if meta.get("alias") else []),
        "source": {
            k: meta[k]
            for k in ("run_id", "version", "aliases", "study", "tracking_uri", "model_uri")
            if k in meta
        },
        "architecture": {
            "class": type(getattr(generator, "module", generator)).__name__,
            "arch": config.get("model.arch", getattr(generator, "arch", "encoder_decoder")),
            "encoder": config.get("model.encoder", getattr(generator, "encoder_name", None)),
            "out_indices": config.get("model.out_indices"),
            "decoder_channels": config.get("model.decoder_channels"),
            "pad_multiple": multiple,
            "parameters": int(sum(p.numel() for p in generator.parameters())),
        },
        "hyperparameters": _hyperparameters(config),
        "config": config,
        "metrics": metrics,
        "metric_conventions": {
            "full": "HU clipped to [-1024, 3072], data range 4096",
            "window": "HU clipped to [-160, 240] (abdomen window), data range 400",
            "ssim": "Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, population covariance",
            "rmse_hu": "root mean squared error in HU",
            "rows": "'ldct' = the low-dose input scored against full dose; 'denoised' = model output",
        },
        "throughput": _throughput(meta),
        # Measured deltas of the validated path vs fp32 on the test panel (DESIGN.md §5b).
        "precision_gate": _precision_gate(meta),
        "normalization": {
            "hu_min": norm.hu_min,
            "hu_max": norm.hu_max,
            "forward": "HU -> clip to [hu_min,hu_max] -> (hu-hu_min)/(hu_max-hu_min)",
            "inverse": "hu = y*(hu_max-hu_min)+hu_min (not clipped)",
            "hu_from_dicom": "pixel_array * RescaleSlope + RescaleIntercept",
        },
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 1, "height", "width"],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "preprocessing": f"unit = clip((hu - ({norm.hu_min:g})) / {span}, 0, 1)",
            "min_size": multiple if multiple > 1 else 2,
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", 1, "height", "width"],
            "dtype": "float32",
            "range": "nominally [0, 1]; not clipped (input + predicted residual)",
            "postprocessing": f"hu = output * {span} + ({norm.hu_min:g})",
        },
        "files": files,
        "export": {
            "onnx": (
                "torch.export (non-strict) of the core for H, W = k * pad_multiple, translated by "
                "torch.onnx.export(dynamo=True); reflect Pad to the multiple and Slice back added as ONNX nodes"
            ),
            "torchscript": "torch.jit.trace of the same core inside a torch.jit.script pad/crop wrapper",
            "openvino": "openvino.convert_model(model.onnx), saved with fp32 weights (compress_to_fp16=False)",
            "timm_same_convs_made_static": replaced,
        },
        "parity_max_abs_hu": parity["max_abs_hu_onnxruntime"],
        "parity": parity,
        "versions": {
            "ldct": getattr(ldct, "__version__", None),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "openvino": _openvino_version(),
        },
    }


def _openvino_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("openvino")
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------
# The entry point


def export_bundle(
    generator: nn.Module,
    meta: dict[str, Any],
    out_dir: str | Path,
    force: bool = False,
    reference_slice_hu: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write model.onnx, model.pt, model.xml/.bin and model_card.json for ``generator`` into ``out_dir``.

    ``meta`` is the bundle's meta (config, normalization, version, run_id, metrics, throughput).
    The ONNX model (onnxruntime, CPU), the TorchScript model and the OpenVINO IR (fp32) are compared with eager PyTorch
    on ``reference_slice_hu`` (default: pydicom's CT_small.dcm, in HU) and on a batch of 3 crops
    of another size; more than 1 HU raises ExportParityError. An existing non-empty ``out_dir`` is
    refused unless ``force``. Everything is written to a temporary directory next to ``out_dir``
    and renamed into place, so a failed export leaves nothing behind. Returns the card (plus
    ``out_dir``).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(
            f"export directory {out} already exists: pass force=True (--force) to replace it"
        )
    norm = normalization_from_meta(meta)
    if reference_slice_hu is None:
        ref_hu, ref_name = reference_slice()
    else:
        ref_hu, ref_name = np.asarray(reference_slice_hu, dtype=np.float32), "given slice"
    if ref_hu.ndim != 2:
        raise ValueError(f"reference_slice_hu must be a 2-D HU image, got shape {ref_hu.shape}")

    eager = copy.deepcopy(getattr(generator, "module", generator)).float().cpu().eval()
    multiple = _pad_multiple(eager)
    core, replaced = _exportable_core(eager, multiple)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        import onnx

        proto = _export_core_onnx(core, multiple)
        proto = _wrap_pad_crop(proto, multiple) if multiple > 1 else _rename_dims(proto)
        onnx.save_model(proto, str(tmp / ONNX_FILE))
        with warnings.catch_warnings():
            # TorchScript is deprecated in favour of torch.export, but it is the one format that
            # is self-contained (pad/crop included) and takes any H, W without ldct or timm.
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit")
            torch.jit.save(_torchscript(core, multiple), str(tmp / TORCHSCRIPT_FILE))
        from ldct.deploy.backends import onnx_to_openvino

        onnx_to_openvino(tmp / ONNX_FILE, tmp / OPENVINO_FILE)

        # Parity: eager fp32 vs both files, via the same loader that deployment uses.
        (tmp / CARD_FILE).write_text(
            json.dumps({"normalization": {"hu_min": norm.hu_min, "hu_max": norm.hu_max}})
        )
        checks = []
        worst = dict.fromkeys(BACKENDS, 0.0)
        runners = {b: ExportedModel(tmp, backend=b) for b in BACKENDS}
        for name, unit in _check_inputs(ref_hu, norm):
            with torch.inference_mode():
                expected = eager(torch.from_numpy(unit)).numpy()
            row: dict[str, Any] = {"case": name, "shape": list(unit.shape)}
            for backend, run in runners.items():
                got = run(unit)
                if got.shape != expected.shape:
                    raise ExportParityError(
                        f"{backend} output shape {got.shape} != PyTorch {expected.shape} on {name} {unit.shape}"
                    )
                err = _max_hu_error(got, expected, norm)
                row[f"max_abs_hu_{backend}"] = err
                worst[backend] = max(worst[backend], err)
            checks.append(row)
        del runners
        bad = {b: e for b, e in worst.items() if not e <= PARITY_TOLERANCE_HU}
        if bad:
            raise ExportParityError(
                f"exported model disagrees with PyTorch on {ref_name}: max |diff| "
                + ", ".join(f"{b} {e:.3f} HU" for b, e in bad.items())
                + f" > {PARITY_TOLERANCE_HU} HU; nothing was written to {out}"
            )
        parity = {
            "reference": ref_name,
            "reference_shape": list(ref_hu.shape),
            "tolerance_hu": PARITY_TOLERANCE_HU,
            "max_abs_hu_onnxruntime": worst["onnxruntime"],
            "max_abs_hu_torchscript": worst["torch"],
            "max_abs_hu_openvino": worst["openvino"],
            "provider": "CPUExecutionProvider",
            "checks": checks,
        }
        files = {
            ONNX_FILE: {
                "format": "onnx",
                "opset": max(
                    (o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None
                ),
                "sha256": _file_sha256(tmp / ONNX_FILE),
            },
            TORCHSCRIPT_FILE: {"format": "torchscript", "sha256": _file_sha256(tmp / TORCHSCRIPT_FILE)},
            OPENVINO_FILE: {"format": "openvino-ir", "sha256": _file_sha256(tmp / OPENVINO_FILE)},
            OPENVINO_WEIGHTS: {
                "format": "openvino-ir weights",
                "sha256": _file_sha256(tmp / OPENVINO_WEIGHTS),
            },
        }
        card = _card(eager, meta, norm, multiple, parity, files, replaced)
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2, default=str) + "\n")

        # Swap into place: the old export (if forced) is moved aside first and removed last.
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**card, "out_dir": str(out)}
