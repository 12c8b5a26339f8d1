"""LSQ fake quantization (Esser et al., ICLR 2020) as a fused autograd function and a module.

The function computes the forward and the LSQ gradients in one pass instead of chaining
divide/clamp/round-STE/multiply through autograd: fewer saved tensors and kernels, same numbers
(the tests compare it with the autograd chain in float64).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dg_quant.quant.config import LSQConfig
from dg_quant.quant.init import init_step


def integer_bounds(bits: int, signed: bool, symmetric: bool = False) -> tuple[int, int]:
    """Return (Q_N, Q_P) so that integers lie in [-Q_N, Q_P]."""
    if not signed:
        return 0, 2**bits - 1
    qp = 2 ** (bits - 1) - 1
    return (qp if symmetric else qp + 1), qp


def _sum_to_shape(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``t`` over the dims a step of ``shape`` was broadcast along (per tensor or per channel)."""
    if math.prod(shape) == 1:
        return t.sum().reshape(shape)
    return t.sum(dim=[i for i, n in enumerate(shape) if n == 1], keepdim=True)


class _LSQFunction(torch.autograd.Function):
    """Fake-quantize ``x`` with step ``s``; gradients per LSQ, optionally EWGS-scaled for x."""

    @staticmethod
    def forward(ctx, x, s, qn, qp, grad_scale, ewgs_delta):  # type: ignore[override]
        v = x / s
        q = torch.clamp(v, -qn, qp).round_()
        ctx.save_for_backward(x, s)
        ctx.qn, ctx.qp, ctx.grad_scale, ctx.ewgs_delta = qn, qp, grad_scale, ewgs_delta
        return q * s

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, s = ctx.saved_tensors
        v = x / s
        inside = (v >= -ctx.qn) & (v <= ctx.qp)
        q = torch.clamp(v, -ctx.qn, ctx.qp).round_()
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = grad_out
            if ctx.ewgs_delta:
                g = g * (1 + ctx.ewgs_delta * torch.sign(grad_out) * (v - q))
            grad_x = torch.where(inside, g, torch.zeros_like(g))
        grad_s = None
        if ctx.needs_input_grad[1]:
            d_s = torch.where(inside, q - v, q) * grad_out
            grad_s = _sum_to_shape(d_s, s.shape) * ctx.grad_scale
        return grad_x, grad_s, None, None, None, None


def lsq_fake_quant(
    x: torch.Tensor,
    step: torch.Tensor,
    qn: int,
    qp: int,
    grad_scale: float = 1.0,
    ewgs_delta: float = 0.0,
) -> torch.Tensor:
    """Fake-quantize ``x`` to integers in [-qn, qp] times ``step`` (broadcast against x)."""
    return _LSQFunction.apply(x, step, qn, qp, grad_scale, ewgs_delta)


class LSQQuantizer(nn.Module):
    """A learnable-step fake quantizer for one tensor (a weight or a layer's input).

    Disabled quantizers are the identity, so a model can be prepared before training and
    switched on later without rebuilding the optimizer: ``step`` is a parameter from the start.
    """

    def __init__(self, config: LSQConfig, shape: tuple[int, ...] = (1,), *, is_weight: bool) -> None:
        super().__init__()
        self.config = config
        self.is_weight = is_weight
        self.step = nn.Parameter(torch.ones(shape))
        self.enabled = True
        self.initialized = False
        self.signed = config.mode in ("signed", "symmetric")
        self.ewgs_delta = 0.0

    @property
    def bits(self) -> int:
        return self.config.bits

    @property
    def bounds(self) -> tuple[int, int]:
        return integer_bounds(self.config.bits, self.signed, self.config.mode == "symmetric")

    def grad_scale(self, x: torch.Tensor) -> float:
        """The factor applied to the step's gradient (METHODS.md 1.2)."""
        variant = self.config.grad_scale
        if variant == "none":
            return 1.0
        n = x.numel()
        if variant == "per_channel":
            # Weights: elements per step entry; activations: features per sample (LSQ paper).
            n = n // self.step.numel() if self.is_weight else n // max(x.shape[0], 1)
        return 1.0 / math.sqrt(self.bounds[1] * max(n, 1))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set the step from data (weights when switched on; activations on the first batch)."""
        if self.config.mode == "auto":
            self.signed = bool((x < 0).any())
        qn, qp = self.bounds
        per_channel = self.step.numel() > 1
        self.step.copy_(init_step(x.detach(), self.config.init, qn, qp, per_channel).reshape(self.step.shape))
        self.initialized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self.initialized:
            self.initialize(x)
        qn, qp = self.bounds
        return lsq_fake_quant(x, self.step, qn, qp, self.grad_scale(x), self.ewgs_delta)

    @torch.no_grad()
    def integers(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes of ``x`` (what an export stores)."""
        qn, qp = self.bounds
        return torch.clamp(x / self.step, -qn, qp).round_()

    def get_extra_state(self) -> dict:
        return {"enabled": self.enabled, "initialized": self.initialized, "signed": self.signed}

    def set_extra_state(self, state: dict) -> None:
        self.enabled = bool(state["enabled"])
        self.initialized = bool(state["initialized"])
        self.signed = bool(state["signed"])

    def extra_repr(self) -> str:
        c = self.config
        return f"bits={c.bits}, mode={c.mode}, step_shape={tuple(self.step.shape)}, enabled={self.enabled}"
