"""EWGS (Lee, Kim, Ham, CVPR 2021; docs/methods.md section 3) as the quantizers' backward rule.

The fused LSQ backward already scales the input gradient by 1 + δ·sign(g)·(v − round(v)) in
*integer* units v = x/s, where |v − round(v)| ≤ ½. EWGS states δ on inputs normalised to [0, 1]
(levels 1/(L − 1) apart), so a paper δ maps to δ_int = δ/(L − 1). The Hessian rule
δ = (Tr(H)/N)/(3·std(g)) computed w.r.t. the quantizer output in integer units gives δ_int
directly; Tr(H) is a Hutchinson estimate (Rademacher probes).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from dg_quant.quant.api import iter_quantizers
from dg_quant.quant.lsq import LSQQuantizer
from dg_quant.quant.norm_stats import frozen_bn_stats

STD_EPS = 1e-12


def levels(quantizer: LSQQuantizer) -> int:
    """Number of quantization levels L = Q_N + Q_P + 1."""
    qn, qp = quantizer.bounds
    return qn + qp + 1


def integer_delta(delta: float, quantizer: LSQQuantizer) -> float:
    """Map a paper δ (inputs normalised to [0, 1]) to the integer-unit δ of the fused backward."""
    return delta / (levels(quantizer) - 1)


def set_fixed_delta_(model: nn.Module, weight_delta: float, act_delta: float | None = None) -> int:
    """Give every quantizer EWGS's fixed δ (paper units; 0 is the STE); returns how many were set."""
    act_delta = weight_delta if act_delta is None else act_delta
    count = 0
    for _, q in iter_quantizers(model):
        q.ewgs_delta = integer_delta(weight_delta if q.is_weight else act_delta, q)
        count += 1
    return count


def hutchinson_trace(
    outputs: list[torch.Tensor],
    grads: list[torch.Tensor],
    scales: list[torch.Tensor],
    max_iter: int = 50,
    tol: float = 1e-3,
) -> list[torch.Tensor]:
    """Tr(D H D) per tensor, with H the Hessian w.r.t. each output and D = diag(scale).

    ``grads`` must come from ``torch.autograd.grad(..., create_graph=True)``. Stops when the
    running mean of every trace changes by less than ``tol`` relatively (or after ``max_iter``).
    """
    sums = [torch.zeros((), device=g.device, dtype=g.dtype) for g in grads]
    previous: list[torch.Tensor] | None = None
    for it in range(1, max_iter + 1):
        probes = [torch.randint_like(g, 2) * 2 - 1 for g in grads]
        vectors = [z * s for z, s in zip(probes, scales)]
        hvs = torch.autograd.grad(grads, outputs, grad_outputs=vectors, retain_graph=True, allow_unused=True)
        for i, (hv, v) in enumerate(zip(hvs, vectors)):
            if hv is not None:
                sums[i] = sums[i] + (hv * v).sum().detach()
        means = [s / it for s in sums]
        if previous is not None:
            change = max(float((m - p).abs() / (p.abs() + STD_EPS)) for m, p in zip(means, previous))
            if change < tol:
                break
        previous = means
    return [s / it for s in sums]


def _capture_outputs(quantizers: list[LSQQuantizer]) -> tuple[list[Any], dict[int, torch.Tensor]]:
    captured: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def fn(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            captured.setdefault(index, output)

        return fn

    handles = [q.register_forward_hook(hook(i)) for i, q in enumerate(quantizers)]
    return handles, captured


def _batch_deltas(
    model: nn.Module,
    quantizers: list[LSQQuantizer],
    batch: tuple[Any, torch.Tensor],
    loss_fn: Any,
    max_iter: int,
    tol: float,
) -> dict[int, float]:
    x, y = batch
    handles, captured = _capture_outputs(quantizers)
    try:
        loss = loss_fn(model(x), y)
    finally:
        for h in handles:
            h.remove()
    idx = [i for i in range(len(quantizers)) if i in captured and captured[i].requires_grad]
    grads = torch.autograd.grad(loss, [captured[i] for i in idx], create_graph=True, allow_unused=True)
    idx, grads = zip(*[(i, g) for i, g in zip(idx, grads) if g is not None]) if idx else ((), ())
    outputs = [captured[i] for i in idx]
    scales = [quantizers[i].step.detach() for i in idx]
    traces = hutchinson_trace(outputs, list(grads), scales, max_iter=max_iter, tol=tol)
    deltas = {}
    for i, g, s, trace in zip(idx, grads, scales, traces):
        g_int = g.detach() * s
        deltas[i] = max(float((trace / g.numel()) / (3 * g_int.std() + STD_EPS)), 0.0)
    return deltas


def hessian_deltas(
    model: nn.Module,
    batches: Iterable[tuple[Any, torch.Tensor]],
    loss_fn: Any,
    max_iter: int = 50,
    tol: float = 1e-3,
) -> dict[str, float]:
    """EWGS's Hessian δ (integer units) per enabled quantizer, averaged over ``batches``.

    δ_int = (Tr(H_u)/N)/(3·std(g_u)) with u = x̂/s the quantizer output in integer units, clipped
    at 0. The model's gradients and BN statistics are left as they were.
    """
    named = [(n, q) for n, q in iter_quantizers(model) if q.enabled]
    if not named:
        return {}
    names, quantizers = zip(*named)
    totals = {n: 0.0 for n in names}
    count = 0
    current = [q.ewgs_delta for q in quantizers]
    for batch in batches:
        # The curvature is measured through STE backwards (δ = 0): the EWGS-scaled backward of
        # the fused function cannot be differentiated twice. BN buffers are saved for the
        # backward, so they are restored only after it.
        try:
            for q in quantizers:
                q.ewgs_delta = 0.0
            with frozen_bn_stats(model):
                deltas = _batch_deltas(model, list(quantizers), batch, loss_fn, max_iter, tol)
        finally:
            for q, delta in zip(quantizers, current):
                q.ewgs_delta = delta
        for i, delta in deltas.items():
            totals[names[i]] += delta
        count += 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # data-parallel training: every process measured its own share of the batch; all take the
        # mean, so that the quantizers (and FQAT's saved δ) stay identical across processes
        values = torch.tensor([totals[n] for n in names], dtype=torch.float64, device=quantizers[0].step.device)
        torch.distributed.all_reduce(values)
        totals = dict(zip(names, (values / torch.distributed.get_world_size()).tolist()))
    return {n: total / max(count, 1) for n, total in totals.items()}


def set_hessian_delta_(
    model: nn.Module, batches: Iterable[tuple[Any, torch.Tensor]], loss_fn: Any, **kwargs: Any
) -> dict[str, float]:
    """Estimate EWGS's Hessian δ per quantizer and set it; returns the δ values (integer units)."""
    deltas = hessian_deltas(model, batches, loss_fn, **kwargs)
    quantizers = dict(iter_quantizers(model))
    for name, delta in deltas.items():
        quantizers[name].ewgs_delta = delta
    return deltas
