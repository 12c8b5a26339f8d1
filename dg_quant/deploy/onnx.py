"""Write a fake-quantized model as an ONNX QDQ graph, fold BatchNorm into it, and verify it.

The graph holds each quantized weight as an int8 initializer with its FP32 per-channel scales
behind ``DequantizeLinear``, each activation quantizer as ``QuantizeLinear``/``DequantizeLinear``
with the learned step, and everything else (BatchNorm, biases, FP layers) as float; the batch
dimension is dynamic. Export goes through torch's TorchScript ONNX exporter (``dynamo=False``),
which works offline and honours the ``symbolic`` methods of ``dg_quant.deploy.qdq``.

``fold_batchnorm`` (on by default) merges a BatchNorm that follows a quantized convolution
into that convolution's per-channel scales and bias: the integer codes stay the same, but the
convolution output then goes straight into the next quantizer, the pattern onnxruntime runs
with int8 kernels (QLinearConv). Folding changes float rounding only (about 1e-7 relative), so
the unfolded graph (``fold_batchnorm=False``) is the one that computes the fake-quant model's
arithmetic op for op.

``float_convolutions`` (on by default) then rewrites the weight of each quantized convolution
that onnxruntime cannot run as QLinearConv (its output is not requantized: a ResNet block's last
conv before the residual Add, a downsample, a weight-only model) from ``DequantizeLinear`` to
``Cast`` + ``Mul`` of the same int8 codes and scales. Same numbers and same file, but onnxruntime
constant-folds ``Cast``/``Mul`` (never ``DequantizeLinear``) at load, so the conv gets a constant
float weight and runs in its blocked NCHWc kernels instead of the plain im2col path (measured on
W8A8 ResNet-50 at batch 32: 1.39x -> 1.5-1.6x the FP graph's speed; benchmarks/results/onnx_cpu.md).
It does the same for a conv between activation quantizers below 8 bits where QLinearConv would
round the bias by more than ``BIAS_ERROR_THRESHOLD`` output steps (per conv, measured from the
graph's steps: ``qlinearconv_bias_error``), unless ``low_bit_int8_kernels``; the weights left to
QLinearConv get finer bias units from ``widen_qlinearconv_weights``.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dg_quant.errors import CheckpointError, ConfigError, require_optional
from dg_quant.io import atomic_write_bytes

OPSET = 17
INT4_OPSET = 21  # the first opset with INT4 tensors in Cast/DequantizeLinear
INPUT, OUTPUT = "input", "logits"
# The largest bias rounding (in output steps) a conv between activation quantizers below 8 bits may
# get from QLinearConv before it is written in float (see float_convolutions_for_onnxruntime). From
# W4A4 runs on PACS: ResNet-18/50 have 8/8 and 31/32 such convs at or below it (at most 0.009) and
# agree 99-100 % with the fake-quant model all as QLinearConv; MobileNetV2 (0.0007-0.087) drops from
# 99.2 % to 93 % with just its three lowest (0.0007, 0.0043, 0.0044) as QLinearConv; only 0.0007 stays.
BIAS_ERROR_THRESHOLD = 0.002


def _onnx() -> Any:
    """The ``onnx`` package, or a one-line error naming the ``onnx`` extra."""
    return require_optional("onnx")


@dataclass
class OnnxExport:
    """What an exported ONNX file holds (from the file itself)."""

    path: str
    file_bytes: int
    int_weights: int  # integer weight initializers (behind DequantizeLinear or Cast)
    int_weight_params: int
    float_params: int
    activation_qdq: int  # QuantizeLinear nodes on activations
    folded_batchnorms: int = 0
    float_convolutions: int = 0  # quantized convs onnxruntime runs in float (weights as Cast + Mul)
    int4_weights: int = 0  # of int_weights, those stored as INT4
    widened_weights: int = 0  # QLinearConv weights whose codes were scaled by a power of two
    low_bit_int8_convs: int = 0  # convs between quantizers below 8 bits kept as QLinearConv
    low_bit_float_convs: int = 0  # ... written in float (their bias rounding is above the threshold)
    layers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    *,
    fold_batchnorm: bool = True,
    float_convolutions: bool = True,
    low_bit_int8_kernels: bool = False,
    float_conv_threshold: float = BIAS_ERROR_THRESHOLD,
    int4: bool = False,
    opset: int = OPSET,
    metadata: dict[str, str] | None = None,
) -> OnnxExport:
    """Write ``model`` (fake-quantized or FP) to ``path`` as an ONNX QDQ graph with a dynamic batch.

    ``example`` is one input batch (its shape past the batch dimension is fixed in the graph).
    Layers that cannot be represented raise a one-line ``ConfigError`` naming the layer.
    ``int4`` stores every integer weight whose codes fit [-8, 7] (4 bits or fewer) as ONNX INT4
    (opset 21; the graph is converted from ``opset``): half the bytes of int8. ``metadata`` goes into
    the file's ``metadata_props`` (``dgq_export`` stores the image size, normalisation and class names).
    A conv between activation quantizers below 8 bits runs as QLinearConv where its bias rounding is at
    most ``float_conv_threshold`` output steps and in float elsewhere; ``low_bit_int8_kernels`` keeps
    QLinearConv for all of them (faster, but it rounds the bias: see ``float_convolutions_for_onnxruntime``).
    """
    onnx = _onnx()
    from dg_quant.deploy.qdq import integer_model

    deployable, plan = integer_model(model)
    buffer = io.BytesIO()
    try:
        with torch.no_grad():
            torch.onnx.export(
                deployable,
                (example,),
                buffer,
                dynamo=False,
                input_names=[INPUT],
                output_names=[OUTPUT],
                opset_version=opset,
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            )
    except Exception as exc:  # noqa: BLE001 - the exporter's errors are long and varied
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ConfigError(
            f"ONNX export failed ({type(exc).__name__}: {first}); "
            "this model has a layer the TorchScript ONNX exporter cannot write"
        ) from None
    graph = onnx.load_from_string(buffer.getvalue())
    _constants_to_initializers(graph.graph)
    if int4:
        graph = _to_opset(graph, INT4_OPSET)
    folded = fold_batchnorms(graph) if fold_batchnorm else 0
    redundant_clips(graph)
    decided = (
        float_convolutions_for_onnxruntime(graph, low_bit_int8_kernels, float_conv_threshold)
        if float_convolutions
        else FloatConvolutions()
    )
    if int4:
        int4_weights(graph)
    widened = widen_qlinearconv_weights(graph)
    float_weight_inputs(graph)  # last: int4_weights writes float weights too
    for key, value in (metadata or {}).items():
        graph.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    data = graph.SerializeToString()
    atomic_write_bytes(path, data)
    report = describe(graph, str(path), len(data))
    report.folded_batchnorms = folded
    report.float_convolutions = decided.rewritten
    report.low_bit_int8_convs = decided.low_bit_integer
    report.low_bit_float_convs = decided.low_bit_float
    report.widened_weights = widened
    report.layers = [asdict(t) for t in plan]
    return report


def describe(graph: Any, path: str = "", file_bytes: int = 0) -> OnnxExport:
    """Count the integer weights, float parameters and activation QDQ pairs of a loaded graph."""
    onnx = _onnx()
    inits = {i.name: i for i in graph.graph.initializer}
    dq_inputs = {n.input[0] for n in graph.graph.node if n.op_type in ("DequantizeLinear", "Cast")}
    int_types = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    ints = [i for name, i in inits.items() if name in dq_inputs and i.data_type in int_types]
    int4 = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    floats = [i for i in inits.values() if i.data_type == onnx.TensorProto.FLOAT]
    q_on_acts = [n for n in graph.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    return OnnxExport(
        path=path,
        file_bytes=file_bytes,
        int_weights=len(ints),
        int_weight_params=sum(int(np.prod(i.dims)) for i in ints),
        float_params=sum(int(np.prod(i.dims)) for i in floats),
        activation_qdq=len(q_on_acts),
        int4_weights=sum(1 for i in ints if i.data_type in int4),
    )


def fold_batchnorms(graph: Any) -> int:
    """Merge each BatchNormalization that alone consumes a Conv with a DequantizeLinear'd integer
    weight into that Conv: scale *= gamma / sqrt(var + eps), bias = (bias - mean) * that + beta.

    The integer codes are unchanged. A channel whose factor is negative negates its codes; a conv
    where that would overflow (a code of -128) keeps its BatchNorm. Returns how many were folded.
    """
    onnx = _onnx()
    g = graph.graph
    _bypass_identities(g)
    inits, producers, consumers = _graph_index(g)
    folded = 0
    for conv in [n for n in g.node if n.op_type == "Conv"]:
        users = consumers.get(conv.output[0], [])
        dq = producers.get(conv.input[1])
        if (
            len(users) != 1
            or users[0].op_type != "BatchNormalization"
            or dq is None
            or dq.op_type != "DequantizeLinear"
        ):
            continue
        bn = users[0]
        if any(name not in inits for name in [*bn.input[1:5], *dq.input[:2]]):
            continue
        if len(consumers.get(dq.output[0], [])) != 1:
            continue
        gamma, beta, mean, var = (onnx.numpy_helper.to_array(inits[name]).astype(np.float64) for name in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        factor = gamma / np.sqrt(var + eps)
        codes = onnx.numpy_helper.to_array(inits[dq.input[0]])
        scale = onnx.numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
        negative = factor < 0
        if negative.any() and (codes[negative] == np.iinfo(codes.dtype).min).any():
            continue
        channels = codes.shape[0]
        new_scale = np.broadcast_to(scale, (channels,)) * np.abs(factor)
        new_codes = np.where(negative.reshape((-1,) + (1,) * (codes.ndim - 1)), -codes, codes).astype(codes.dtype)
        bias = (
            onnx.numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
            if len(conv.input) > 2 and conv.input[2]
            else 0.0
        )
        new_bias = (bias - mean) * factor + beta
        key = conv.name or conv.output[0]
        dq.input[0] = _add_init(g, inits, f"{key}.weight_codes", new_codes)
        dq.input[1] = _add_init(g, inits, f"{key}.weight_scale", new_scale.astype(np.float32))
        if scale.size == 1:  # a per-tensor step becomes per channel
            dq.attribute.extend([onnx.helper.make_attribute("axis", 0)])
        zero_name = _add_init(g, inits, f"{key}.weight_zero_point", np.zeros(channels, dtype=codes.dtype))
        if len(dq.input) > 2:
            dq.input[2] = zero_name
        else:
            dq.input.append(zero_name)
        bias_name = _add_init(g, inits, f"{key}.folded_bias", new_bias.astype(np.float32))
        if len(conv.input) > 2:
            conv.input[2] = bias_name
        else:
            conv.input.append(bias_name)
        conv.output[0] = bn.output[0]
        g.node.remove(bn)
        folded += 1
    _drop_unused_initializers(g)
    return folded


def redundant_clips(graph: Any) -> int:
    """Drop each float ``Clip`` (ReLU6) that alone feeds an activation ``QuantizeLinear`` whose integer
    range, narrowed by the Clip on its codes below 8 bits, lies inside the Clip's; returns how many.

    The quantizer saturates at that range anyway, so the graph computes the same numbers, and the
    Conv -> QuantizeLinear pattern runs as QLinearConv. onnxruntime drops such a Clip itself only
    when the container's full range (0..255 steps) fits in it: never for a 4-bit quantizer after
    ReLU6 (W4A4 MobileNetV2 ran 2 of its 52 convs as int8 before this).
    """
    onnx = _onnx()
    g = graph.graph
    inits, producers, consumers = _graph_index(g)
    dropped = 0
    for clip in [n for n in g.node if n.op_type == "Clip"]:
        users = consumers.get(clip.output[0], [])
        if len(users) != 1 or users[0].op_type != "QuantizeLinear" or len(clip.input) < 3:
            continue
        q = users[0]
        if any(name not in inits for name in [*clip.input[1:3], *q.input[1:3]]):
            continue
        low, high = (float(onnx.numpy_helper.to_array(inits[name])) for name in clip.input[1:3])
        scale = onnx.numpy_helper.to_array(inits[q.input[1]]).astype(np.float64)
        zero = onnx.numpy_helper.to_array(inits[q.input[2]])
        if scale.size != 1 or zero.size != 1:
            continue
        info = np.iinfo(zero.dtype)
        qmin, qmax = int(info.min), int(info.max)
        after = consumers.get(q.output[0], [])
        if len(after) == 1 and after[0].op_type == "Clip" and all(name in inits for name in after[0].input[1:3]):
            qmin, qmax = (int(onnx.numpy_helper.to_array(inits[name])) for name in after[0].input[1:3])
        zero_value, step = int(zero), float(scale)
        if not (low <= (qmin - zero_value) * step and (qmax - zero_value) * step <= high):
            continue
        q.input[0] = clip.input[0]
        g.node.remove(clip)
        dropped += 1
    _drop_unused_initializers(g)
    return dropped


@dataclass
class FloatConvolutions:
    """What ``float_convolutions_for_onnxruntime`` did: the convs it wrote in float, and how the QLinearConv
    candidates between activation quantizers below 8 bits were decided (integer or float)."""

    rewritten: int = 0
    low_bit_integer: int = 0
    low_bit_float: int = 0


def float_convolutions_for_onnxruntime(
    graph: Any, low_bit_int8_kernels: bool = False, threshold: float = BIAS_ERROR_THRESHOLD
) -> FloatConvolutions:
    """Give each Conv with a DequantizeLinear'd integer weight whose output onnxruntime cannot
    requantize (see the module docstring) its weight as ``Mul(Cast(codes), scale)``; returns how many.

    onnxruntime fuses DequantizeLinear -> Conv -> QuantizeLinear (a Relu between them is dropped
    when the zero point is the type's minimum) into QLinearConv; those convs keep their
    DequantizeLinear. Every other quantized conv runs in float anyway.

    A conv whose input or output quantizer has fewer than 8 bits is written in float as well where
    QLinearConv would round its bias by more than ``threshold`` output steps (``qlinearconv_bias_error``,
    after ``widen_qlinearconv_weights``), unless ``low_bit_int8_kernels``: QLinearConv adds the bias
    (BatchNorm's, folded in) as an int32 in units of input step x weight step, a share of the output
    values up to that error moves by one step, and a one-step move of a 4-bit code carries on
    through the network (trained W4A4 MobileNetV2 on PACS, errors up to 0.09 step: 90 % top-1
    agreement with the fake-quant model all as QLinearConv, 99 % in float, 93 % with only the three
    at most 0.0045 as QLinearConv; W4A4 ResNet-18/50, at most 0.009: 99-100 % all as QLinearConv).
    8-bit convs always stay QLinearConv (a one-step move of an 8-bit code is 16x smaller).
    """
    onnx = _onnx()
    g = graph.graph
    inits, producers, consumers = _graph_index(g)
    done = FloatConvolutions()
    for conv in [n for n in g.node if n.op_type == "Conv"]:
        dq = producers.get(conv.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or any(name not in inits for name in dq.input[:2]):
            continue
        if len(consumers.get(dq.output[0], [])) != 1:
            continue
        low_bit = False
        if _runs_as_qlinearconv(conv, producers, consumers, inits):
            low_bit = _low_bit_activations(conv, producers, consumers)
            error = qlinearconv_bias_error(conv, producers, consumers, inits) if low_bit else None
            if not low_bit or low_bit_int8_kernels or (error is not None and error <= threshold):
                done.low_bit_integer += low_bit
                continue
        codes = onnx.numpy_helper.to_array(inits[dq.input[0]])
        zero = onnx.numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] in inits else 0
        unwritable = np.any(zero != 0) or codes.dtype not in (np.int8, np.uint8)
        if unwritable or (_weight_axis(dq) != 0 and np.size(onnx.numpy_helper.to_array(inits[dq.input[1]])) > 1):
            done.low_bit_integer += low_bit  # it stays QLinearConv
            continue
        _dequantize_as_cast_mul(g, inits, dq)
        done.rewritten += 1
        done.low_bit_float += low_bit
    _drop_unused_initializers(g)
    return done


def float_weight_inputs(graph: Any) -> int:
    """Write the activation ``DequantizeLinear`` in front of each Conv/Gemm with a *float* weight as
    ``Cast`` (+ ``Sub`` of the zero point) + ``Mul``; returns how many.

    Same numbers, but onnxruntime's ``WeightBiasQuantization`` (on by default since 1.20) no
    longer sees the pattern DequantizeLinear -> Conv/Gemm (float weight) -> [Relu/Clip] ->
    QuantizeLinear, which it runs as an int8 layer with the float weight rounded to a per-tensor
    int8 grid of its own: an FP layer between two quantizers (FQAT's first layer, whose weights
    stay FP while its input is quantized) computed other numbers than the trained model. The same
    holds for an integer weight written as ``Cast`` + ``Mul`` (onnxruntime folds it to a float
    constant) when the layer's output reaches a QuantizeLinear: a conv between quantizers below
    8 bits, or one whose ReLU also feeds a residual Add; a conv into a residual Add alone keeps its
    ``DequantizeLinear`` (onnxruntime leaves that pattern alone).
    """
    onnx = _onnx()
    g = graph.graph
    inits, producers, consumers = _graph_index(g)
    rewritten = 0
    for node in [n for n in g.node if n.op_type in ("Conv", "ConvTranspose", "Gemm")]:
        dq = producers.get(node.input[0])
        weight = node.input[1]
        if dq is None or not _float_weight(weight, inits, producers):
            continue
        if weight not in inits and not _feeds_quantizer(node, consumers):
            continue
        if dq.op_type != "DequantizeLinear" or dq.input[0] in inits or len(consumers.get(dq.output[0], [])) != 1:
            continue
        if any(name not in inits for name in dq.input[1:]):
            continue
        scale = onnx.numpy_helper.to_array(inits[dq.input[1]])
        zero = onnx.numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else 0
        if np.size(scale) != 1 or np.size(zero) != 1:
            continue
        key = dq.name or dq.output[0]
        nodes = [onnx.helper.make_node("Cast", [dq.input[0]], [f"{key}.float_codes"], to=onnx.TensorProto.FLOAT)]
        codes = nodes[0].output[0]
        if int(zero) != 0:
            shift = _add_init(g, inits, f"{key}.float_zero_point", np.asarray(float(zero), dtype=np.float32))
            nodes.append(onnx.helper.make_node("Sub", [codes, shift], [f"{key}.float_shifted_codes"]))
            codes = nodes[-1].output[0]
        step = _add_init(g, inits, f"{key}.float_scale", scale.reshape(()).astype(np.float32))
        nodes.append(onnx.helper.make_node("Mul", [codes, step], [dq.output[0]]))
        index = list(g.node).index(dq)
        g.node.remove(dq)
        for offset, new in enumerate(nodes):
            g.node.insert(index + offset, new)
        rewritten += 1
    _drop_unused_initializers(g)
    return rewritten


def _float_weight(name: str, inits: dict[str, Any], producers: dict[str, Any]) -> bool:
    """Whether onnxruntime sees ``name`` as a constant float weight: a float initializer, or
    ``Mul(Cast(codes), scale)`` of initializers, which it constant-folds at load."""
    onnx = _onnx()
    if name in inits:
        return inits[name].data_type == onnx.TensorProto.FLOAT
    mul = producers.get(name)
    if mul is None or mul.op_type != "Mul" or len(mul.input) != 2 or mul.input[1] not in inits:
        return False
    cast = producers.get(mul.input[0])
    return cast is not None and cast.op_type == "Cast" and cast.input[0] in inits


def _feeds_quantizer(node: Any, consumers: dict[str, list[Any]]) -> bool:
    """Whether a QuantizeLinear consumes ``node``'s output, directly or after a Relu/Clip."""
    users = consumers.get(node.output[0], [])
    after = [n for u in users if u.op_type in ("Relu", "Clip") for n in consumers.get(u.output[0], [])]
    return any(n.op_type == "QuantizeLinear" for n in users + after)


def int4_weights(graph: Any) -> int:
    """Store each int8 weight initializer whose codes fit [-8, 7] as INT4; returns how many. Needs an
    opset-21 graph.

    A float weight (``Cast`` + ``Mul``) casts INT4 to float; onnxruntime folds it at load. A weight
    onnxruntime runs as QLinearConv keeps its ``DequantizeLinear``, behind a ``Cast`` of the INT4
    codes to int8 that onnxruntime folds at load (onnxruntime has no int4 conv kernels): as a float
    weight, onnxruntime's ``WeightBiasQuantization`` would round it to an int8 grid of its own.
    """
    onnx = _onnx()
    g = graph.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    converted = 0
    for name, init in list(inits.items()):
        users = consumers.get(name, [])
        if init.data_type != onnx.TensorProto.INT8 or len(users) != 1:
            continue
        node = users[0]
        if node.op_type == "DequantizeLinear" and node.input[0] != name:
            continue
        if node.op_type not in ("DequantizeLinear", "Cast"):
            continue
        codes = onnx.numpy_helper.to_array(init)
        if codes.size == 0 or codes.min() < -8 or codes.max() > 7:
            continue
        packed = onnx.helper.make_tensor(name, onnx.TensorProto.INT4, codes.shape, _pack_int4(codes), raw=True)
        g.initializer.remove(init)
        g.initializer.append(packed)
        inits[name] = packed
        if node.op_type == "DequantizeLinear":
            cast = onnx.helper.make_node("Cast", [name], [f"{name}.int8"], to=onnx.TensorProto.INT8)
            node.input[0] = cast.output[0]
            g.node.insert(list(g.node).index(node), cast)
        converted += 1
    _drop_unused_initializers(g)
    return converted


def _pack_int4(codes: np.ndarray) -> bytes:
    """Two's-complement nibbles, two per byte, the first element in the low nibble (ONNX's INT4 layout)."""
    nibbles = (codes.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()


def _weight_axis(dq: Any) -> int:
    return next((a.i for a in dq.attribute if a.name == "axis"), 1)


def _dequantize_as_cast_mul(g: Any, inits: dict[str, Any], dq: Any) -> Any:
    """Replace a weight's ``DequantizeLinear`` (zero point 0, axis 0) by ``Mul(Cast(codes), scale)``;
    returns the Cast node."""
    onnx = _onnx()
    codes = inits[dq.input[0]]
    scale = onnx.numpy_helper.to_array(inits[dq.input[1]])
    shape = (-1,) + (1,) * (len(codes.dims) - 1) if scale.size > 1 else ()
    key = dq.name or dq.output[0]
    scale_name = _add_init(g, inits, f"{key}.weight_scale_float", scale.reshape(shape).astype(np.float32))
    cast = onnx.helper.make_node("Cast", [dq.input[0]], [f"{key}.weight_float_codes"], to=onnx.TensorProto.FLOAT)
    mul = onnx.helper.make_node("Mul", [cast.output[0], scale_name], [dq.output[0]])
    index = list(g.node).index(dq)
    g.node.remove(dq)
    g.node.insert(index, mul)
    g.node.insert(index, cast)
    return cast


def _to_opset(graph: Any, opset: int) -> Any:
    """``graph`` converted to ``opset`` by onnx's version converter, or a one-line ``ConfigError``."""
    onnx = _onnx()
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(graph, opset)
    except Exception as exc:  # noqa: BLE001 - the converter raises RuntimeError/ValueError with long texts
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(
            f"INT4 export needs ONNX opset {opset}, and onnx could not convert this graph ({first})"
        ) from None
    converted.ir_version = max(converted.ir_version, 10)  # INT4 tensors need IR version 10
    return onnx.load_from_string(converted.SerializeToString())


def _runs_as_qlinearconv(conv: Any, producers: dict, consumers: dict, inits: dict) -> bool:
    """Whether onnxruntime's QDQ fusion turns ``conv`` into QLinearConv: a DequantizeLinear'd
    activation input and one QuantizeLinear (after at most one Relu or Clip) consuming its output."""
    source = producers.get(conv.input[0])
    if source is None or source.op_type != "DequantizeLinear" or source.input[0] in inits:
        return False
    return _output_quantizer(conv, consumers) is not None


def _output_quantizer(conv: Any, consumers: dict) -> Any | None:
    """The one QuantizeLinear consuming ``conv``'s output, after at most one Relu or Clip (onnxruntime
    drops a Relu, or a Clip (ReLU6) whose range holds the quantizer's, before it), else None."""
    users = consumers.get(conv.output[0], [])
    if len(users) == 1 and users[0].op_type in ("Relu", "Clip"):
        users = consumers.get(users[0].output[0], [])
    return users[0] if len(users) == 1 and users[0].op_type == "QuantizeLinear" else None


def _low_bit_activations(conv: Any, producers: dict, consumers: dict) -> bool:
    """Whether the activation grid into or out of a QLinearConv candidate is narrower than its 8-bit
    container: a ``Clip`` on the integers before its input's DequantizeLinear or after its output's
    QuantizeLinear (``dg_quant.deploy.qdq`` writes one below 8 bits)."""
    source = producers.get(producers[conv.input[0]].input[0])
    after = consumers.get(_output_quantizer(conv, consumers).output[0], [])
    return (source is not None and source.op_type == "Clip") or any(n.op_type == "Clip" for n in after)


def widen_qlinearconv_weights(graph: Any) -> int:
    """Multiply the codes of each weight that onnxruntime runs as QLinearConv by a power of two
    ``k`` per output channel (its scale divided by ``k``: the same float weights, exactly) as far
    as int8 allows; returns how many weights changed.

    QLinearConv rounds the float bias to an int32 in units of input step x weight step; ``k``
    makes that unit ``k`` times finer (4-bit weights: 16x). ``k * |code|`` stays at most
    32767 / (2 * the largest uint8 input), so that x86 kernels without VNNI, which add pairs of
    uint8 x int8 products in int16, cannot saturate. A weight stored as INT4 becomes int8 at load
    (``Cast`` to int32, ``Mul`` by ``k``, ``Cast`` to int8: onnxruntime folds the constants).
    """
    onnx = _onnx()
    g = graph.graph
    inits, producers, consumers = _graph_index(g)
    widened = 0
    for conv in [n for n in g.node if n.op_type == "Conv"]:
        dq = producers.get(conv.input[1])
        if (
            dq is None
            or dq.op_type != "DequantizeLinear"
            or not _runs_as_qlinearconv(conv, producers, consumers, inits)
        ):
            continue
        if len(consumers.get(dq.output[0], [])) != 1 or any(name not in inits for name in dq.input[1:3]):
            continue
        source = producers.get(dq.input[0])  # a Cast of INT4 codes (int4_weights), or none
        packed = source.input[0] if source is not None and source.op_type == "Cast" else dq.input[0]
        if packed not in inits or len(consumers.get(packed, [])) != 1:
            continue
        k = _conv_widening(conv, dq, packed, producers, inits)
        if k is None or np.all(k == 1):
            continue
        codes = onnx.numpy_helper.to_array(inits[packed]).astype(np.int32)
        scale = onnx.numpy_helper.to_array(inits[dq.input[1]])
        shape = (-1,) + (1,) * (codes.ndim - 1)
        key = conv.name or conv.output[0]
        dq.input[1] = _add_init(g, inits, f"{key}.widened_weight_scale", (scale / k).astype(np.float32))
        if source is None:
            dq.input[0] = _add_init(g, inits, f"{key}.widened_weight_codes", (codes * k.reshape(shape)).astype(np.int8))
        else:  # INT4 -> int32 * k -> int8, folded by onnxruntime at load
            factor = _add_init(
                g, inits, f"{key}.weight_widening", k.reshape(shape if k.size > 1 else ()).astype(np.int32)
            )
            del source.attribute[:]
            source.attribute.append(onnx.helper.make_attribute("to", onnx.TensorProto.INT32))
            wide = onnx.helper.make_node("Mul", [source.output[0], factor], [f"{key}.widened_codes_int32"])
            narrow = onnx.helper.make_node("Cast", [wide.output[0]], [f"{key}.widened_codes"], to=onnx.TensorProto.INT8)
            dq.input[0] = narrow.output[0]
            index = list(g.node).index(dq)
            g.node.insert(index, narrow)
            g.node.insert(index, wide)
        widened += 1
    _drop_unused_initializers(g)
    return widened


def _conv_widening(conv: Any, dq: Any, codes_name: str, producers: dict, inits: dict) -> np.ndarray | None:
    """The factor ``widen_qlinearconv_weights`` multiplies the codes ``codes_name`` of ``dq`` by (one
    per output channel, or one for all), or None where it leaves the weight alone."""
    onnx = _onnx()
    if codes_name not in inits or any(name not in inits for name in dq.input[1:3]):
        return None
    codes = onnx.numpy_helper.to_array(inits[codes_name]).astype(np.int32)
    scale = onnx.numpy_helper.to_array(inits[dq.input[1]])
    zero = onnx.numpy_helper.to_array(inits[dq.input[2]])
    if np.any(zero != 0) or (scale.size > 1 and _weight_axis(dq) != 0) or codes.size == 0:
        return None
    return _widening(codes, scale.size > 1, _largest_input(conv, producers, inits))


def qlinearconv_bias_error(conv: Any, producers: dict, consumers: dict, inits: dict) -> float | None:
    """The worst rounding error of the bias, in output steps, if onnxruntime runs ``conv`` as
    QLinearConv with the codes widened: half the int32 bias unit (input step x weight step of the
    output channel / the widening), over the step of the QuantizeLinear after the conv (after its
    Relu/Clip), the largest over the output channels. None where ``conv`` is no QLinearConv candidate.
    """
    onnx = _onnx()
    if not _runs_as_qlinearconv(conv, producers, consumers, inits):
        return None
    dq = producers.get(conv.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in inits:
        return None
    x_scale, y_scale = producers[conv.input[0]].input[1], _output_quantizer(conv, consumers).input[1]
    if x_scale not in inits or y_scale not in inits:
        return None
    k = _conv_widening(conv, dq, dq.input[0], producers, inits)
    w_step = onnx.numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64) / (1.0 if k is None else k)
    x_step = float(onnx.numpy_helper.to_array(inits[x_scale]).astype(np.float64).max())
    y_step = float(onnx.numpy_helper.to_array(inits[y_scale]).astype(np.float64).min())
    return float(0.5 * x_step * np.max(w_step) / y_step)


def qlinearconv_bias_errors(graph: Any) -> dict[str, float]:
    """``qlinearconv_bias_error`` of every QLinearConv candidate of ``graph``, by conv name."""
    inits, producers, consumers = _graph_index(graph.graph)
    errors = {}
    for conv in [n for n in graph.graph.node if n.op_type == "Conv"]:
        error = qlinearconv_bias_error(conv, producers, consumers, inits)
        if error is not None:
            errors[conv.name or conv.output[0]] = error
    return errors


def _widening(codes: np.ndarray, per_channel: bool, largest_input: int) -> np.ndarray:
    """The power of two each output channel's codes can be multiplied by (one for all channels of a
    per-tensor weight): int8 range, and no int16 overflow of two products with the largest input."""
    flat = codes.reshape(len(codes) if per_channel else 1, -1).astype(np.int64)
    low, high = np.maximum(-flat.min(1), 0), np.maximum(flat.max(1), 0)
    pairs = 32767 // (2 * max(largest_input, 1))
    k = np.ones(len(flat), dtype=np.int64)
    for _ in range(7):  # at most 2**7: a code of +-1 becomes +-128
        wider = 2 * k
        grow = (np.maximum(low, high) > 0) & (wider * low <= 128) & (wider * high <= 127)
        k = np.where(grow & (wider * np.maximum(low, high) <= pairs), wider, k)
    return k.astype(np.float32) if per_channel else np.asarray(float(k[0]), dtype=np.float32)


def _largest_input(conv: Any, producers: dict, inits: dict) -> int:
    """The largest uint8 value the x86 kernel multiplies: an integer Clip's upper bound, else 255
    (onnxruntime turns int8 activations into uint8 with zero point 128)."""
    onnx = _onnx()
    source = producers.get(producers[conv.input[0]].input[0])
    if source is not None and source.op_type == "Clip" and len(source.input) > 2 and source.input[2] in inits:
        return int(onnx.numpy_helper.to_array(inits[source.input[2]]))
    return 255


def _add_init(g: Any, inits: dict[str, Any], name: str, value: np.ndarray) -> str:
    onnx = _onnx()
    g.initializer.append(onnx.numpy_helper.from_array(np.ascontiguousarray(value), name))
    inits[name] = g.initializer[-1]
    return name


def _graph_index(g: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[Any]]]:
    """Initializers by name, the node producing each value, and the nodes consuming each value."""
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return inits, producers, consumers


def _bypass_identities(g: Any) -> None:
    """Point the users of ``Identity(initializer)`` (the exporter's de-duplication) at the initializer."""
    inits = {i.name for i in g.initializer}
    outputs = {o.name for o in g.output}
    alias = {
        n.output[0]: n.input[0]
        for n in g.node
        if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs
    }
    for n in g.node:
        for k, name in enumerate(n.input):
            if name in alias:
                n.input[k] = alias[name]
    for n in [n for n in g.node if n.op_type == "Identity" and n.output[0] in alias]:
        g.node.remove(n)


def _constants_to_initializers(g: Any) -> None:
    """Turn tensor-valued ``Constant`` nodes (the exporter's zero points and clip bounds) into
    initializers, so that the graph passes find every constant input in one place."""
    onnx = _onnx()
    outputs = {o.name for o in g.output}
    for node in [n for n in g.node if n.op_type == "Constant" and n.output[0] not in outputs]:
        if [a.name for a in node.attribute] != ["value"]:
            continue
        value = onnx.numpy_helper.to_array(node.attribute[0].t)
        g.initializer.append(onnx.numpy_helper.from_array(value, node.output[0]))
        g.node.remove(node)


def _drop_unused_initializers(g: Any) -> None:
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    for node in [n for n in g.node if n.op_type == "Constant" and n.output[0] not in used]:
        g.node.remove(node)


# -- running and verifying ------------------------------------------------------------------------


@dataclass
class Agreement:
    """How one onnxruntime session's logits compare with the fake-quant model's."""

    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float


@dataclass
class Verification:
    """The ONNX model against the fake-quant model on the same inputs, run twice: as deployed
    (onnxruntime's graph optimizations on: fused kernels, int8 QLinearConv) and op for op
    (optimizations off), which computes the fake-quant arithmetic."""

    images: int
    max_logit: float
    optimized: Agreement
    op_for_op: Agreement

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def onnx_session(
    path: str | os.PathLike, threads: int | None = None, optimize: bool = True, config: dict[str, str] | None = None
) -> Any:
    """An onnxruntime CPU session; a missing, corrupt or foreign file is a one-line ``CheckpointError``.

    ``config`` holds onnxruntime session config entries, e.g. ``{"session.disable_quant_qdq": "1"}``,
    which makes onnxruntime fold weight-only DequantizeLinear nodes into float weights at load.
    """
    ort = require_optional("onnxruntime")

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; export it with dgq_export --format onnx")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidProtobuf types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"{path} is not a loadable ONNX model ({first}); export it again") from None


def run_onnx(session: Any, x: torch.Tensor, path: str = "the ONNX model") -> np.ndarray:
    """Logits of ``session`` on ``x``; an input the graph does not accept is a ``CheckpointError``."""
    spec = session.get_inputs()[0]
    expected = spec.shape[1:]
    if len(spec.shape) != x.dim() or any(isinstance(d, int) and d != n for d, n in zip(expected, x.shape[1:])):
        raise CheckpointError(
            f"{path} takes inputs of shape {spec.shape} but the data has {list(x.shape)}; export it from this run"
        )
    x = x.detach().to(torch.float32) if x.is_floating_point() else x.detach()
    return session.run(None, {spec.name: x.numpy()})[0]


def verify_onnx(path: str | os.PathLike, model: nn.Module, batches: list[torch.Tensor]) -> Verification:
    """Compare the ONNX file's logits with ``model``'s (the fake-quant model) on ``batches``.

    A file that does not load, takes other inputs or gives another number of outputs than the
    model fails with a one-line ``CheckpointError``.
    """
    sessions = {"optimized": onnx_session(path), "op_for_op": onnx_session(path, optimize=False)}
    model = model.eval()
    wants = []
    with torch.no_grad():
        for x in batches:
            wants.append(model(x).detach().to(torch.float32).numpy())
    results = {}
    for key, session in sessions.items():
        diffs, agree, total = [], 0, 0.0
        for x, want in zip(batches, wants):
            got = run_onnx(session, x, str(path))
            if got.shape != want.shape:
                raise CheckpointError(
                    f"{path} gives outputs of shape {list(got.shape)} but the model gives "
                    f"{list(want.shape)}; it was exported from another model"
                )
            d = np.abs(got.astype(np.float64) - want)
            diffs.append(float(d.max()))
            total += float(d.mean(-1).sum())
            agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        count = sum(len(x) for x in batches)
        results[key] = Agreement(max(diffs, default=0.0), total / max(count, 1), agree / max(count, 1))
    peak = max((float(np.abs(w).max()) for w in wants), default=0.0)
    return Verification(images=sum(len(x) for x in batches), max_logit=peak, **results)
