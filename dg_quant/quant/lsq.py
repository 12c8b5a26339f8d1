"""LSQ fake quantization (Esser et al., ICLR 2020) as a fused autograd function and a module.

The function computes the forward and the LSQ gradients in one pass instead of chaining
divide/clamp/round-STE/multiply through autograd: fewer saved tensors and kernels, same numbers
(the tests compare it with the autograd chain in float64).

``compiled=True`` (opt-in, ``LSQQuantizer.compiled`` or ``api.set_compiled_kernels``) runs the
same maths through ``torch.compile``d kernels: one fused pass forward and one backward, 2-3x
less quantizer time than the eager kernel on CPU (benchmarks/README.md). Forward values and
``x`` gradients are identical; the step gradient is the same sum in another order (float
rounding only). The first calls compile six small graphs (20-70 s on a 2-core CPU; torch caches
them on disk). A quantizer uses them only for tensors of ``COMPILED_MIN_NUMEL`` elements or more
(``LSQQuantizer.kernels_for``): below that the eager pass costs less than a compiled call's dispatch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn

from dg_quant.quant.config import LSQConfig
from dg_quant.quant.init import init_step

# Below this many elements the eager kernels are faster than the compiled ones: a compiled call costs
# ~50-100 us of dispatch (dynamo guards, AOT wrappers), more than the whole eager pass over a small
# weight (profiled on CPU: crossover near 2^18 elements for forward + backward; benchmarks/README.md).
COMPILED_MIN_NUMEL = 1 << 18


def integer_bounds(bits: int, signed: bool, symmetric: bool = False) -> tuple[int, int]:
    """Return (Q_N, Q_P) so that integers lie in [-Q_N, Q_P]."""
    if not signed:
        return 0, 2**bits - 1
    qp = 2 ** (bits - 1) - 1
    return (qp if symmetric else qp + 1), qp


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _sum_to_shape(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``t`` over the dims a step of ``shape`` was broadcast along (per tensor or per channel)."""
    if math.prod(shape) == 1:
        return t.sum().reshape(shape)
    return t.sum(dim=[i for i, n in enumerate(shape) if n == 1], keepdim=True)


def _fq_forward(x: torch.Tensor, s: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    return torch.clamp(x / s, -qn, qp).round() * s


def _fq_backward(
    x: torch.Tensor, s: torch.Tensor, grad_out: torch.Tensor, qn: int, qp: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x gradient, step gradient per row) for ``x`` as rows ``[C, K]`` with ``s`` as ``[C, 1]``."""
    v = x / s
    inside = (v > -qn) & (v < qp)
    q = torch.round(torch.clamp(v, -qn, qp))
    grad_x = torch.where(inside, grad_out, 0.0)
    d_s = torch.where(inside, q - v, q) * grad_out
    return grad_x, d_s.sum(dim=1, keepdim=True)


@functools.cache
def _compiled_kernels() -> tuple[Callable, Callable]:
    """The fused kernels, compiled once per process on first use (dynamic shapes)."""
    return torch.compile(_fq_forward, dynamic=True), torch.compile(_fq_backward, dynamic=True)


def _plain_alias(t: torch.Tensor) -> torch.Tensor:
    """``t``'s memory as a tensor that is not a view: dynamo also guards on a view's base, which
    would multiply the compiled graphs (one per base shape) up to its recompile limit."""
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


class _Rows:
    """``x`` seen as rows ``[C, K]`` (one per step entry; one row if per tensor), in memory order.

    Every weight or activation then reaches the compiled kernels as the same 2-D problem, so a
    handful of graphs serve all layers; channels_last tensors are viewed, not copied.
    """

    def __init__(self, x: torch.Tensor, s: torch.Tensor) -> None:
        nhwc = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        self.order = (0, 2, 3, 1) if nhwc else tuple(range(x.dim()))
        self.stored_shape = tuple(x.shape[d] for d in self.order)
        self.n_rows = x.shape[0] if s.numel() > 1 else 1

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        return _plain_alias(t.detach().permute(self.order).reshape(self.n_rows, -1))

    def restore(self, t: torch.Tensor) -> torch.Tensor:
        inverse = sorted(range(len(self.order)), key=self.order.__getitem__)
        return t.reshape(self.stored_shape).permute(inverse)


def _compiled_forward(x: torch.Tensor, s: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    # Detached plain tensors: dynamo keeps Parameter shapes static (one graph per layer).
    layout = _Rows(x, s)
    rows_s = _plain_alias(s.detach().reshape(-1, 1))
    return layout.restore(_compiled_kernels()[0](layout.rows(x), rows_s, qn, qp))


def _compiled_backward(
    x: torch.Tensor, s: torch.Tensor, grad_out: torch.Tensor, qn: int, qp: int
) -> tuple[torch.Tensor, torch.Tensor]:
    layout = _Rows(x, s)
    rows_s = _plain_alias(s.detach().reshape(-1, 1))
    grad_x, grad_s = _compiled_kernels()[1](layout.rows(x), rows_s, layout.rows(grad_out), qn, qp)
    return layout.restore(grad_x), grad_s.reshape(s.shape)


@functools.cache
def _open_range(qn: int, qp: int, dtype: torch.dtype) -> tuple[float, float] | None:
    """[lo, hi]: the ``dtype`` values strictly inside (-Q_N, Q_P), if they round to the bounds.

    ``clamp(v, lo, hi) == v`` is then the strict range test of docs/methods.md 1.1 (the STE passes only
    strictly inside, as autograd's clamp in lsq-net) in one comparison, and rounding the clamped
    value gives the codes. None where the next value below Q_P rounds down (bf16 with Q_P >= 128).
    """
    inf = torch.tensor(math.inf, dtype=dtype)
    lo = torch.nextafter(torch.tensor(-qn, dtype=dtype), inf)
    hi = torch.nextafter(torch.tensor(qp, dtype=dtype), -inf)
    if lo.round().item() != -qn or hi.round().item() != qp:
        return None
    return lo.item(), hi.item()


def _inside_and_codes(v: torch.Tensor, qn: int, qp: int, mask: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(strictly inside the range, round(clamp(v))); eager uses the one-comparison test.

    ``mask=False`` skips the bool mask (None): LSQ's own gradients take it from ``_inside_only``.
    """
    if not torch.compiler.is_compiling():  # a compiled graph fuses the plain test anyway
        open_range = _open_range(qn, qp, v.dtype)
        if open_range is not None:
            q = v.clamp(*open_range)
            return (q == v if mask else None), q.round_()
    return ((v > -qn) & (v < qp) if mask else None), v.clamp(-qn, qp).round_()


_HARDTANH_BACKWARD = torch.ops.aten.hardtanh_backward.default
_HARDTANH_BACKWARD_OUT = torch.ops.aten.hardtanh_backward.grad_input


def _inside_only(t: torch.Tensor, v: torch.Tensor, qn: int, qp: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` where ``-qn < v < qp`` (strictly, docs/methods.md 1.1), else 0, in one vectorized pass.

    aten's ``hardtanh_backward`` is exactly this masking. On CPU, ``torch.where`` with a bool mask
    or a multiply by one runs ~10x slower than a plain element-wise pass (it was most of the eager
    backward's time: 28 ms for a 2M-element activation, 3 ms now). Same values as
    ``where(inside, t, 0)`` for every non-NaN ``v``; ``out`` may be ``v`` itself (in place).
    """
    if out is None:
        return _HARDTANH_BACKWARD(t, v, -qn, qp)
    return _HARDTANH_BACKWARD_OUT(t, v, -qn, qp, grad_input=out)


class _LSQFunction(torch.autograd.Function):
    """Fake-quantize ``x`` with step ``s``; gradients per LSQ, optionally EWGS-scaled (x and step).

    Speed: the forward allocates one tensor (divide, then clamp/round/multiply in place) and the
    backward about four; the range mask is applied by ``_inside_only`` (one vectorized pass, no bool
    tensor; EWGS builds the mask from one clamp to the open range and one comparison,
    ``_open_range``). Only ``x`` (usually kept alive anyway by the
    layer before, e.g. a ReLU's output) and ``s`` are saved.
    A half-precision ``x`` (bf16/fp16 autocast) is computed in the step's precision and returned
    in its own dtype, so quantized activations stay half precision.
    """

    @staticmethod
    def forward(ctx, x, s, qn, qp, grad_scale, ewgs_delta, compiled):  # type: ignore[override]
        out = fake_quant_values(x, s, qn, qp, compiled)
        ctx.save_for_backward(x, s)
        ctx.qn, ctx.qp, ctx.grad_scale, ctx.ewgs_delta = qn, qp, grad_scale, ewgs_delta
        ctx.compiled = compiled
        return out.to(x.dtype) if x.dtype in _HALF_DTYPES else out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, s = ctx.saved_tensors
        grad_x, grad_s = lsq_gradients(
            x, s, grad_out, ctx.qn, ctx.qp, ctx.grad_scale, ctx.ewgs_delta, ctx.compiled, ctx.needs_input_grad[:2]
        )
        return grad_x, grad_s, None, None, None, None, None


def fake_quant_values(x: torch.Tensor, s: torch.Tensor, qn: int, qp: int, compiled: bool = False) -> torch.Tensor:
    """``round(clamp(x/s, -qn, qp))·s`` without autograd (what the forward of ``lsq_fake_quant`` returns).

    Eager: one allocation (divide, then clamp/round/multiply in place); ``compiled``: one fused kernel.
    """
    if compiled:
        return _compiled_forward(x, s, qn, qp)
    return torch.div(x, s).clamp_(-qn, qp).round_().mul_(s)


def lsq_gradients(
    x: torch.Tensor,
    s: torch.Tensor,
    grad_out: torch.Tensor,
    qn: int,
    qp: int,
    grad_scale: float,
    ewgs_delta: float = 0.0,
    compiled: bool = False,
    needs: tuple[bool, bool] = (True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(x gradient, step gradient) of LSQ fake quantization, given the output's gradient ``grad_out``.

    ``needs`` says which of the two to compute (None for the others). Shared by ``lsq_fake_quant``
    and the fused quantized layers (``dg_quant.quant.fused``), so both give the same numbers.
    """
    if compiled and not ewgs_delta:  # EWGS keeps the eager backward
        grad_x, grad_s = _compiled_backward(x, s, grad_out, qn, qp)
        grad_s = (grad_s * grad_scale).to(s.dtype) if needs[1] else None
        grad_x = grad_x.to(x.dtype) if needs[0] else None
        return grad_x, grad_s
    v = torch.div(x, s)
    inside, q = _inside_and_codes(v, qn, qp, mask=bool(ewgs_delta))
    return _gradients_from_codes(v, inside, q, s, grad_out, (qn, qp), grad_scale, ewgs_delta, needs, x.dtype)


def _gradients_from_codes(
    v: torch.Tensor,
    inside: torch.Tensor | None,
    q: torch.Tensor,
    s: torch.Tensor,
    grad_out: torch.Tensor,
    bounds: tuple[int, int],
    grad_scale: float,
    ewgs_delta: float,
    needs: tuple[bool, bool],
    x_dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The eager gradients from ``v = x/s`` and the codes (``v`` and ``q`` are overwritten).

    ``inside`` (the bool range mask) is needed for EWGS only; LSQ masks with ``_inside_only``.
    """
    qn, qp = bounds
    if ewgs_delta:
        return _ewgs_gradients(v, inside, q, s, grad_out, grad_scale, ewgs_delta, needs, x_dtype)
    grad_x = _inside_only(grad_out, v, qn, qp).to(x_dtype) if needs[0] else None
    grad_s = None
    if needs[1]:
        # q - v inside the range, q (the clipped bound) outside, times the upstream gradient.
        in_place = None if torch.is_grad_enabled() else v  # a double backward (EWGS's Hessian) records it
        d_s = q.sub_(_inside_only(v, v, qn, qp, out=in_place)).mul_(grad_out)
        grad_s = _sum_to_shape(d_s, s.shape).mul_(grad_scale).to(s.dtype)
    return grad_x, grad_s


def _ewgs_gradients(
    v: torch.Tensor,
    inside: torch.Tensor,
    q: torch.Tensor,
    s: torch.Tensor,
    grad_out: torch.Tensor,
    grad_scale: float,
    ewgs_delta: float,
    needs: tuple[bool, bool],
    x_dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """EWGS: the gradient behind the rounding scaled element-wise by ``1 + δ·sign(g)·(v - q)``."""
    g = grad_out * (1 + ewgs_delta * torch.sign(grad_out) * (v - q))
    grad_x = torch.where(inside, g, 0.0).to(x_dtype) if needs[0] else None
    grad_s = None
    if needs[1]:
        # The step reaches the output through q·s and through v = x/s inside the rounding;
        # EWGS's scaled gradient flows along the second path (as into EWGS's interval).
        d_s = q.mul(grad_out).sub_(v.mul_(inside).mul_(g))
        grad_s = _sum_to_shape(d_s, s.shape).mul_(grad_scale).to(s.dtype)
    return grad_x, grad_s


class WeightRecompute:
    """Backward of a layer that saved ``x`` and ``s`` but not ``fake_quant(x, s)``: ``values`` recomputes
    it, ``gradients`` then gives LSQ's gradients reusing that pass's intermediates (eager: the
    recomputation costs one multiply over what ``lsq_gradients`` does anyway)."""

    def __init__(self, x: torch.Tensor, s: torch.Tensor, qn: int, qp: int, compiled: bool, ewgs_delta: float) -> None:
        self.x, self.s, self.qn, self.qp = x, s, qn, qp
        self.compiled = compiled and not ewgs_delta
        self.ewgs_delta = ewgs_delta
        self._codes: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None

    def values(self) -> torch.Tensor:
        if self.compiled:
            return _compiled_forward(self.x, self.s, self.qn, self.qp)
        v = torch.div(self.x, self.s)
        inside, q = _inside_and_codes(v, self.qn, self.qp, mask=bool(self.ewgs_delta))
        self._codes = (v, inside, q)
        return q * self.s

    def gradients(
        self, grad_out: torch.Tensor, grad_scale: float, needs: tuple[bool, bool]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self._codes is None:
            return lsq_gradients(
                self.x, self.s, grad_out, self.qn, self.qp, grad_scale, self.ewgs_delta, self.compiled, needs
            )
        v, inside, q = self._codes
        self._codes = None
        return _gradients_from_codes(
            v, inside, q, self.s, grad_out, (self.qn, self.qp), grad_scale, self.ewgs_delta, needs, self.x.dtype
        )


def lsq_fake_quant(
    x: torch.Tensor,
    step: torch.Tensor,
    qn: int,
    qp: int,
    grad_scale: float = 1.0,
    ewgs_delta: float = 0.0,
    compiled: bool = False,
) -> torch.Tensor:
    """Fake-quantize ``x`` to integers in [-qn, qp] times ``step`` (broadcast against x).

    ``compiled`` uses the fused ``torch.compile`` kernels (module docstring).
    """
    return _LSQFunction.apply(x, step, qn, qp, grad_scale, ewgs_delta, compiled)


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
        self.compiled = False  # fused torch.compile kernels for large tensors (opt-in; see kernels_for)
        self.fused_layer = True  # a weight quantizer's layer runs dg_quant.quant.fused (api.set_fused_layers)

    @property
    def bits(self) -> int:
        return self.config.bits

    @property
    def bounds(self) -> tuple[int, int]:
        return integer_bounds(self.config.bits, self.signed, self.config.mode == "symmetric")

    def kernels_for(self, x: torch.Tensor) -> bool:
        """Whether ``x`` goes through the compiled kernels: when they are on, and ``x`` is large enough
        for them to pay (``COMPILED_MIN_NUMEL``); forward values are the same either way."""
        return self.compiled and x.numel() >= COMPILED_MIN_NUMEL

    def grad_scale(self, x: torch.Tensor) -> float:
        """The factor applied to the step's gradient (docs/methods.md 1.2)."""
        variant = self.config.grad_scale
        if variant == "none":
            return 1.0
        n = x.numel()
        if variant == "per_channel":
            # Weights: elements per step entry; activations: features per sample (LSQ paper).
            n = n // self.step.numel() if self.is_weight else n // max(x.shape[0], 1)
        return 1.0 / math.sqrt(self.bounds[1] * max(n, 1))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, method: str | None = None) -> None:
        """Set the step from data (weights when switched on; activations on the first batch).

        ``method`` overrides the config's ``init`` (``lsq`` or ``mse``).
        """
        if self.config.mode == "auto":
            self.signed = bool((x < 0).any())
        qn, qp = self.bounds
        per_channel = self.step.numel() > 1
        self.step.copy_(init_step(x.detach(), method or self.config.init, qn, qp, per_channel).reshape(self.step.shape))
        self.initialized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self.initialized:
            self.initialize(x)
        qn, qp = self.bounds
        g = self.grad_scale(x)
        return lsq_fake_quant(x, self.step, qn, qp, g, self.ewgs_delta, self.kernels_for(x))

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
