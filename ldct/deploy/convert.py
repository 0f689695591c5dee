"""Conversion of a generator into deployable files: ONNX, TorchScript, OpenVINO IR, int8 / fp16.

Below the runners (which build their files with it) and the export bundle (which writes and
checks them); it never runs a model for inference itself.

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

Reduced precisions are conversions too: int8 post-training static quantisation calibrated on
*training* slices (onnxruntime's per-channel QDQ quantiser, OpenVINO NNCF), and an fp16 copy of
the ONNX graph for onnxruntime's CUDA provider.
"""

from __future__ import annotations

import copy
import inspect
import logging
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldct.deploy.capabilities import cpu_capabilities
from ldct.errors import LdctError

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.pt"
OPENVINO_FILE = "model.xml"
OPENVINO_WEIGHTS = "model.bin"
INPUT_NAME = "input"
OUTPUT_NAME = "output"


class ExportError(LdctError, RuntimeError):
    """The generator cannot be exported as it is (the message says why and what to do)."""


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


def prepare_export(generator: nn.Module) -> tuple[nn.Module, nn.Module, int, int]:
    """``(eager, core, pad_multiple, replaced)`` for exporting ``generator``.

    ``eager``: a CPU fp32 eval copy (DDP/compiled wrappers unwrapped), the reference the parity
    check compares against; ``core``: its exportable copy (see :func:`_exportable_core`).
    """
    eager = copy.deepcopy(getattr(generator, "module", generator)).float().cpu().eval()
    multiple = _pad_multiple(eager)
    core, replaced = _exportable_core(eager, multiple)
    return eager, core, multiple, replaced


def onnx_model(core: nn.Module, multiple: int) -> Any:
    """The ModelProto of model.onnx: the exported core, inside pad/crop nodes when ``multiple > 1``."""
    proto = _export_core_onnx(core, multiple)
    return _wrap_pad_crop(proto, multiple) if multiple > 1 else _rename_dims(proto)


def onnx_opset(proto: Any) -> int | None:
    """The default-domain opset ``proto`` was written for."""
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None)


def export_onnx(generator: nn.Module, path: str | Path) -> dict[str, Any]:
    """Write only the ONNX model of ``generator`` (same graph as in a bundle, no parity check).

    For benchmarks and experiments; deployment uses :func:`ldct.deploy.export.export_bundle`.
    Returns ``{"path", "pad_multiple", "timm_same_convs_made_static", "opset"}``.
    """
    import onnx

    _, core, multiple, replaced = prepare_export(generator)
    proto = onnx_model(core, multiple)
    onnx.save_model(proto, str(path))
    return {
        "path": str(path),
        "pad_multiple": multiple,
        "timm_same_convs_made_static": replaced,
        "opset": onnx_opset(proto),
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


def torchscript_model(core: nn.Module, multiple: int) -> torch.jit.ScriptModule:
    """model.pt: the traced core inside a scripted reflect-pad / crop wrapper (any H, W)."""
    example = torch.rand(2, 1, 2 * multiple, 2 * multiple) if multiple > 1 else torch.rand(2, 1, 64, 64)
    with warnings.catch_warnings():
        # Tracer warnings about shape-derived Python values: exact here because the core only
        # ever sees multiples of pad_multiple (checked by export_bundle's parity runs).
        warnings.simplefilter("ignore")
        with torch.no_grad():
            traced = torch.jit.trace(core, example, check_trace=False)
        return torch.jit.script(_PadCrop(traced, multiple)).eval()


# --------------------------------------------------------------------------------------------
# onnxruntime: int8 and fp16 copies of model.onnx


class _Calibration:
    """onnxruntime CalibrationDataReader over unit slices [1,1,H,W]."""

    def __init__(self, slices: Iterable[np.ndarray]) -> None:
        self._items = iter([{INPUT_NAME: s} for s in slices])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def quantize_onnx_int8(onnx_path: Path, calibration: Sequence[np.ndarray], out_path: Path) -> Path:
    """Static per-channel QDQ int8 of the Conv layers, calibrated on ``calibration`` (training data).

    The input scaling, the final residual add and the pad/crop stay float: they carry the image
    itself, and rounding them to 8 bits would cost ~16 HU on a [-1024, 3072] HU input.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out_path.with_name(out_path.stem + ".pre.onnx")
    quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
    quantize_static(
        str(pre),
        str(out_path),
        _Calibration(calibration),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv"],
        nodes_to_exclude=_onnx_image_convs(onnx.load(str(pre))),
        per_channel=True,
        # Without VNNI, u8 x s8 products saturate in vpmaddubsw; 7-bit weights avoid it.
        reduce_range=not cpu_capabilities()["vnni"],
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    pre.unlink(missing_ok=True)
    return out_path


def _onnx_image_convs(proto: Any) -> list[str]:
    """Conv nodes that read the image itself (reachable from the graph input without a Conv).

    Quantising their input would put the image on an 8-bit grid (16 HU steps over 4096 HU), and
    the residual skip shares that tensor; these convolutions stay float.
    """
    image = {i.name for i in proto.graph.input}
    first = []
    for node in proto.graph.node:  # ONNX nodes are topologically sorted
        if not any(t in image for t in node.input):
            continue
        if node.op_type == "Conv":
            first.append(node.name)
        else:
            image.update(node.output)
    return first


def onnx_to_fp16(onnx_path: Path, out_path: Path) -> Path:
    """An fp16 copy of ``onnx_path`` with float32 input and output kept (onnxruntime's CUDA EP)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save_model(convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True), str(out_path))
    return out_path


# --------------------------------------------------------------------------------------------
# OpenVINO


def onnx_to_openvino(onnx_path: Path, xml_path: Path) -> Path:
    """model.onnx -> model.xml/.bin with the ONNX model's dynamic N/H/W, weights kept in fp32."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    # save_model compresses weights to fp16 by default; the fp32 IR is the reference for every
    # precision (bf16/int8 are chosen at compile time or by NNCF, and judged against it).
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return xml_path


def quantize_openvino_int8(model: Any, calibration: Sequence[np.ndarray]) -> Any:
    """NNCF post-training quantisation of an OpenVINO model on ``calibration`` (training slices).

    Mixed preset: symmetric int8 weights (per channel), asymmetric activations; the image path
    (input scaling, the convolutions reading the image, the residual add) stays float.
    """
    import nncf

    nncf.set_log_level(logging.WARNING)  # its INFO lines list every ignored node
    dataset = nncf.Dataset(list(calibration))
    return nncf.quantize(
        model,
        dataset,
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(calibration),
        fast_bias_correction=True,
        ignored_scope=nncf.IgnoredScope(names=_openvino_image_ops(model), validate=False),
    )


def _openvino_image_ops(model: Any) -> list[str]:
    """Ops that touch the image itself: convolutions reading it and elementwise ops combining it.

    NNCF would otherwise put a quantiser on the model input (moved up through Pad, so the
    residual skip reads the 8-bit image: measured 500 HU off at bone) and on the residual
    before the final add. Shape arithmetic reachable from the input is listed too; NNCF does
    not quantise it either way.
    """
    image: set[str] = set()
    ignored = []
    for op in model.get_ordered_ops():
        kind, name = op.get_type_name(), op.get_friendly_name()
        if kind == "Parameter":
            image.add(name)
            continue
        if not any(
            op.input_value(i).get_node().get_friendly_name() in image for i in range(op.get_input_size())
        ):
            continue
        if kind in ("Convolution", "GroupConvolution"):
            ignored.append(name)
            continue
        image.add(name)
        if kind in ("Add", "Subtract", "Multiply", "Divide", "Concat", "MatMul"):
            ignored.append(name)
    return ignored
