"""A fake-quantized model rewritten with explicit integer weights and quantize/dequantize steps.

The LSQ weight grid is signed (or symmetric) per output channel: codes in [-Q_N, Q_P] with
Q_N <= 128, so an int8 tensor with zero point 0 and the learned step as scale holds a 2..8-bit
weight exactly, and ``code * step`` in float32 is what both the fake-quant forward and ONNX
``DequantizeLinear`` compute. An activation quantizer becomes QuantizeLinear/DequantizeLinear
with the learned step: uint8 (zero point 0) for unsigned, int8 for signed 8-bit, uint8 with zero
point 128 for signed below 8 bits, plus a Clip on the integers when the bit width is below 8
(QuantizeLinear saturates at the container's range).
``QuantizeLinear`` divides and rounds half to even, as ``torch.round`` does, so the integers are
the fake-quant model's. The rewritten model computes the same numbers in torch; its
``symbolic`` methods tell the ONNX (TorchScript) exporter which ONNX ops to write.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from dg_quant.errors import ConfigError
from dg_quant.quant.api import ACT_QUANTIZER, iter_quantized_weights, latent_weight
from dg_quant.quant.lsq import LSQQuantizer


@dataclass(frozen=True)
class QuantizedTensor:
    """How one weight or activation of the model is represented in the integer model."""

    layer: str  # e.g. "layer1.0.conv1.weight" or "layer1.0.conv1 input"
    kind: str  # "weight" or "activation"
    bits: int
    container: str  # "int8" or "uint8"
    qmin: int
    qmax: int
    per_channel: bool


class _DequantizeWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, codes: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:  # type: ignore[override]
        shape = [1] * codes.dim()
        if scale.dim() == 1:  # per channel (a 0-d scale is per tensor)
            shape[axis] = -1
        return codes.to(torch.float32) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, codes, scale, axis: int):  # pragma: no cover - run by the ONNX exporter
        n = scale.type().sizes()
        zero = torch.zeros(n[0] if n else (), dtype=torch.int8)
        if n:
            return g.op("DequantizeLinear", codes, scale, g.op("Constant", value_t=zero), axis_i=axis)
        return g.op("DequantizeLinear", codes, scale, g.op("Constant", value_t=zero))


class IntegerWeight(nn.Module):
    """A parametrization whose value is ``codes * scale``: the int8 codes and FP32 scales are
    buffers (ONNX initializers); the latent FP weight it is registered on is ignored."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer(
            "scale",
            scale.detach().to(torch.float32).reshape(-1)
            if scale.numel() > 1
            else scale.detach().to(torch.float32).reshape(()),
        )

    def forward(self, _latent: torch.Tensor) -> torch.Tensor:
        return _DequantizeWeight.apply(self.codes, self.scale, 0)


class _QuantizeDequantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:  # type: ignore[override]
        return torch.clamp(x / scale, qmin, qmax).round() * scale

    @staticmethod
    def symbolic(g, x, scale, qmin: int, qmax: int):  # pragma: no cover - run by the ONNX exporter
        dtype, zero = activation_container(qmin, qmax)
        zero_point = g.op("Constant", value_t=torch.tensor(zero, dtype=dtype))
        q = g.op("QuantizeLinear", x, scale, zero_point)
        info = torch.iinfo(dtype)
        if (qmin + zero, qmax + zero) != (info.min, info.max):  # below 8 bits: QuantizeLinear only saturates at 8
            q = g.op(
                "Clip",
                q,
                g.op("Constant", value_t=torch.tensor(qmin + zero, dtype=dtype)),
                g.op("Constant", value_t=torch.tensor(qmax + zero, dtype=dtype)),
            )
        return g.op("DequantizeLinear", q, scale, zero_point)


def activation_container(qmin: int, qmax: int) -> tuple[torch.dtype, int]:
    """The ONNX type and zero point of an activation grid [qmin, qmax] (zero point 0 maps code 0 to 0.0).

    Unsigned grids are uint8 with zero point 0. A signed 8-bit grid is int8 with zero point 0;
    onnxruntime turns such Q/DQ pairs into uint8 with zero point 128 itself, which x86 integer
    kernels need. A signed grid below 8 bits is written in that form directly, uint8 with zero point
    128 (codes + 128): the Clip that narrows its range sits between QuantizeLinear and
    DequantizeLinear, where onnxruntime's conversion no longer recognises the pair, so an int8 one
    would keep the layer (e.g. every linear of a W4A4 DeiT) off the integer kernels.
    """
    if qmin >= 0:
        return torch.uint8, 0
    if (qmin, qmax) == (-128, 127):
        return torch.int8, 0
    return torch.uint8, 128


class QuantizeDequantize(nn.Module):
    """Stands in for an activation ``LSQQuantizer`` (same pre-hook, same numbers)."""

    def __init__(self, scale: torch.Tensor, qmin: int, qmax: int) -> None:
        super().__init__()
        self.enabled = True  # read by the pre-hook ``quantize_`` registered
        self.qmin, self.qmax = qmin, qmax
        self.register_buffer("scale", scale.detach().to(torch.float32).reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantizeDequantize.apply(x, self.scale, self.qmin, self.qmax)


def _check_quantizer(q: LSQQuantizer, label: str) -> None:
    if not q.initialized:
        raise ConfigError(
            f"{label}: its quantizer was never initialized (no step learned); "
            "export a checkpoint saved after quantization started"
        )
    step = q.step.detach()
    if not bool(torch.isfinite(step).all()) or not bool((step > 0).all()):
        raise ConfigError(
            f"{label}: its quantization step is not a positive finite number, so it cannot "
            "be an ONNX scale; export another checkpoint"
        )
    qn, qp = q.bounds
    if -qn < -128 or qp > (255 if not q.signed else 127):
        raise ConfigError(f"{label}: a {q.bits}-bit {q.config.mode} grid does not fit an 8-bit container")


def _label(module_name: str, tensor: str) -> str:
    return f"{module_name}.{tensor}" if module_name else tensor


def integer_model(model: nn.Module) -> tuple[nn.Module, list[QuantizedTensor]]:
    """A float32 eval copy of ``model`` whose quantized weights are int8 codes times their steps
    and whose activation quantizers are quantize/dequantize steps; the model is not changed.

    Disabled quantizers (a checkpoint from before quantization started) are dropped: those
    tensors stay FP. A quantizer that cannot be represented raises a one-line ``ConfigError``
    that names its layer.
    """
    model = copy.deepcopy(model).to(torch.float32).eval()
    plan: list[QuantizedTensor] = []
    for name, module, tensor_name, q in list(iter_quantized_weights(model)):
        label = _label(name, tensor_name)
        chain = module.parametrizations[tensor_name]
        index = next(i for i, p in enumerate(chain) if p is q)
        # Swap the list entry (not remove_parametrizations, which edits the parametrized class that
        # the deep copy shares with the caller's model).
        if not q.enabled:
            chain[index] = nn.Identity()
            continue
        _check_quantizer(q, label)
        latent = latent_weight(module, tensor_name).detach()
        codes = q.integers(latent)
        qn, qp = q.bounds
        chain[index] = IntegerWeight(codes, q.step)
        plan.append(QuantizedTensor(label, "weight", q.bits, "int8", -qn, qp, q.step.numel() > 1))
    for name, module in list(model.named_modules()):
        q = getattr(module, ACT_QUANTIZER, None)
        if not isinstance(q, LSQQuantizer):
            continue
        label = f"{name or 'model'} input"
        if not q.enabled:
            continue  # the pre-hook skips a disabled quantizer: the input stays FP
        _check_quantizer(q, label)
        qn, qp = q.bounds
        setattr(module, ACT_QUANTIZER, QuantizeDequantize(q.step, -qn, qp))
        container = str(activation_container(-qn, qp)[0]).removeprefix("torch.")
        plan.append(QuantizedTensor(label, "activation", q.bits, container, -qn, qp, False))
    return model, plan
