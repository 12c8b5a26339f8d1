"""Quantized convolutions and linears that keep no fake-quantized weight for backward.

Through the parametrization, ``conv(x, LSQ(w, s))`` keeps ``w`` and ``s`` (for LSQ's backward)
*and* the fake-quantized weight ``w_q`` (for the convolution's backward): one extra copy of every
weight per step, which is most of QT-DoG's extra memory at small batches. Here one autograd function
does the layer: it keeps ``x``, ``w`` and ``s``, recomputes ``w_q`` in backward (one pass over the
weight, O(parameters) against the layer's O(activations) work), takes the input and weight
gradients from ``aten.convolution_backward`` / matmul, and applies LSQ's gradients with the same
code as ``lsq_fake_quant`` (``lsq.lsq_gradients``). Values and gradients equal the parametrized
path up to float rounding (tests/quant/test_fused.py).

``install`` puts the fused ``forward`` on the class that ``parametrize`` made for one module (one
class per module); the state_dict, ``module.weight``, export and ``remove_parametrizations`` are
unchanged. The module falls back to the plain path whenever the fused one would not be the same
computation: quantizer off, hooks on the quantizer (EWGS captures its output), no autograd, tracing
or ``torch.compile`` (which fuses the plain path itself), other parametrizations, unusual padding.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrize

from dg_quant.quant.lsq import LSQQuantizer, WeightRecompute, fake_quant_values

_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_SUPPORTED_FORWARDS = (nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


@dataclass(frozen=True)
class _Layer:
    """The layer's operation: a linear (``conv_dims`` 0) or an N-d convolution with its geometry."""

    conv_dims: int = 0
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if not self.conv_dims:
            return F.linear(x, w, b)
        return _CONV_FUNCTIONS[self.conv_dims](x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def backward(
        self, grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, has_bias: bool, needs: tuple[bool, bool, bool]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(input, weight, bias) gradients, each only where ``needs`` says so."""
        if self.conv_dims:
            zeros = [0] * self.conv_dims
            bias_sizes = [w.shape[0]] if has_bias else None
            return torch.ops.aten.convolution_backward(
                grad, x, w, bias_sizes, self.stride, self.padding, self.dilation, False, zeros, self.groups, list(needs)
            )
        grad_x = grad.matmul(w) if needs[0] else None
        rows = grad.reshape(-1, grad.shape[-1])
        grad_w = rows.t().mm(x.reshape(-1, x.shape[-1])) if needs[1] else None
        grad_b = rows.sum(0) if needs[2] else None
        return grad_x, grad_w, grad_b


@dataclass(frozen=True)
class _WeightQuant:
    """The weight quantizer's settings for one call (bounds, gradient scale, kernel choice)."""

    qn: int
    qp: int
    grad_scale: float
    ewgs_delta: float
    compiled: bool


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class _QuantizedLayerFunction(torch.autograd.Function):
    """``layer(x, fake_quant(w, s), b)``, saving ``x``, ``w`` and ``s`` only (``w_q`` is recomputed)."""

    @staticmethod
    def forward(ctx, x, weight, step, bias, layer, quant):  # type: ignore[override]
        w_q = fake_quant_values(weight, step, quant.qn, quant.qp, quant.compiled)
        cast = _autocast_dtype(x.device)  # as autocast would cast the plain path's conv inputs
        if cast is not None:
            x, w_q = x.to(cast), w_q.to(cast)
            bias = bias.to(cast) if bias is not None else None
        with torch.autocast(x.device.type, enabled=False) if cast is not None else contextlib.nullcontext():
            out = layer.forward(x, w_q, bias)
        ctx.save_for_backward(x, weight, step)
        ctx.layer, ctx.quant, ctx.cast, ctx.has_bias = layer, quant, cast, bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, step = ctx.saved_tensors
        quant: _WeightQuant = ctx.quant
        need_x, need_w, need_s, need_b = ctx.needs_input_grad[:4]
        recompute = WeightRecompute(weight, step, quant.qn, quant.qp, quant.compiled, quant.ewgs_delta)
        w_q = recompute.values()
        if ctx.cast is not None:
            w_q, grad_out = w_q.to(ctx.cast), grad_out.to(ctx.cast)
        grad_x, grad_wq, grad_b = ctx.layer.backward(
            grad_out, x, w_q, ctx.has_bias, (need_x, need_w or need_s, need_b and ctx.has_bias)
        )
        del w_q
        grad_w = grad_s = None
        if grad_wq is not None:
            grad_w, grad_s = recompute.gradients(grad_wq.to(weight.dtype), quant.grad_scale, (need_w, need_s))
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_x, grad_w, grad_s, grad_b, None, None


def _layer_of(module: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> _Layer | None:
    """The fused operation for ``module`` on input ``x``, or None where only the plain path fits."""
    if isinstance(module, nn.Linear):
        return _Layer() if x.dim() >= 2 else None
    dims = weight.dim() - 2 if isinstance(module, nn.modules.conv._ConvNd) else 0
    if not dims or x.dim() != dims + 2 or module.padding_mode != "zeros" or isinstance(module.padding, str):
        return None
    return _Layer(dims, tuple(module.stride), tuple(module.padding), tuple(module.dilation), module.groups)


def _hooked(q: nn.Module) -> bool:
    """Hooks on the quantizer would not fire on the fused path (EWGS captures its output)."""
    from torch.nn.modules import module as module_globals

    local = q._forward_hooks or q._forward_pre_hooks
    return bool(local or module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks)


def _weight_quantizer(module: nn.Module) -> LSQQuantizer | None:
    """The module's only parametrization if it is an enabled LSQ weight quantizer, else None."""
    plists = module.parametrizations
    if len(plists) != 1 or "weight" not in plists or len(plists.weight) != 1:
        return None
    q = plists.weight[0]
    if not isinstance(q, LSQQuantizer) or not q.enabled or not q.fused_layer or _hooked(q):
        return None
    return q


def _fused_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``forward`` of a parametrized conv/linear: the fused function where it applies, else the plain one."""
    plain = super(type(self), self).forward
    if (
        not torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or parametrize._cache_enabled
        or not isinstance(x, torch.Tensor)
    ):
        return plain(x)
    q = _weight_quantizer(self)
    weight = self.parametrizations.weight.original
    layer = _layer_of(self, weight, x) if q is not None else None
    if layer is None:
        return plain(x)
    if not q.initialized:
        q.initialize(weight)
    qn, qp = q.bounds
    quant = _WeightQuant(qn, qp, q.grad_scale(weight), q.ewgs_delta, q.kernels_for(weight))
    return _QuantizedLayerFunction.apply(x, weight, q.step, self.bias, layer, quant)


def install(module: nn.Module) -> bool:
    """Give a just-parametrized conv/linear the fused forward; False (nothing done) for other modules.

    Only a class that ``parametrize`` made for this module and whose base is a plain ``nn.Linear`` or
    ``nn.ConvNd`` is changed (subclasses with their own ``forward`` keep it).
    """
    cls = type(module)
    if not parametrize.is_parametrized(module) or not cls.__name__.startswith("Parametrized"):
        return False
    base = cls.__bases__[0]
    if base.forward not in _SUPPORTED_FORWARDS:
        return False
    cls.forward = _fused_forward
    return True
