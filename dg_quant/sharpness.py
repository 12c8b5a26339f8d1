"""SAGM's two-pass gradient (Wang et al., CVPR 2023; docs/methods.md section 6), host-neutral.

Both ``dg_quant.sagm`` and ``dg_quant.fqat`` call ``sagm_gradients``: it returns the clean-loss
gradient g (FQAT's g_QAT) and the gradient g' at the perturbed point
θ' = θ + (ρ/‖g‖ − α)·g (FQAT's g_flat) *separately*, so a caller can route them per parameter.
``apply_sagm_`` writes SAGM's own combination ½(g + g') into ``.grad``. The perturbed pass never
changes BatchNorm running statistics, and the parameters are restored bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dg_quant.errors import ConfigError
from dg_quant.options import option
from dg_quant.quant.norm_stats import frozen_bn_stats

NORM_EPS = 1e-12
PerturbFilter = Callable[[nn.Parameter], bool]


@dataclass
class SAGMOptions:
    """SAGM's two knobs (flags ``--rho``, ``--alpha``); shared by ``dg_quant.sagm`` and FQAT."""

    rho: float = option(
        0.05, "SAGM perturbation radius ρ (SAM's ball)", search=lambda r: float(r.choice([0.01, 0.02, 0.05, 0.1]))
    )
    alpha: float = option(
        0.001,
        "SAGM gradient-matching coefficient α (PACS 0.001, DomainNet 0.0005)",
        search=lambda r: float(r.choice([0.0005, 0.001, 0.01, 0.02, 0.05, 0.1])),
    )

    def __post_init__(self) -> None:
        if not self.rho > 0:
            raise ConfigError(f"rho must be > 0; got {self.rho}")
        if self.alpha < 0:
            raise ConfigError(f"alpha must be >= 0; got {self.alpha}")


@dataclass
class TwoPassGradients:
    """The two gradients of one SAGM step, aligned with ``params`` (None: no gradient)."""

    params: list[nn.Parameter]
    task: list[torch.Tensor | None]
    flat: list[torch.Tensor | None]
    loss: torch.Tensor
    perturbed_loss: torch.Tensor
    grad_norm: torch.Tensor

    def metrics(self) -> dict[str, Any]:
        return {
            "loss": self.loss,
            "sagm/perturbed_loss": self.perturbed_loss,
            "sagm/surrogate_gap": self.perturbed_loss - self.loss,
            "sagm/grad_norm": self.grad_norm,
        }


def _forward_backward(
    model: nn.Module, batch: tuple[Any, torch.Tensor], loss_fn: Any, params: list[nn.Parameter]
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    x, y = batch
    for p in params:
        p.grad = None
    loss = loss_fn(model(x), y)
    loss.backward()
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return loss.detach(), grads


def sagm_gradients(
    model: nn.Module,
    batch: tuple[Any, torch.Tensor],
    loss_fn: Any,
    rho: float,
    alpha: float,
    perturb: PerturbFilter | None = None,
) -> TwoPassGradients:
    """Compute g at θ and g' at θ + (ρ/‖g‖ − α)·g; leaves ``.grad`` empty and θ unchanged.

    :param perturb: which parameters move in the perturbation (default: all with a gradient);
        ‖g‖ is the global norm over the moved ones. The others still get g' at the moved point.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    loss, task = _forward_backward(model, batch, loss_fn, params)
    moved = [i for i, (p, g) in enumerate(zip(params, task)) if g is not None and (perturb is None or perturb(p))]
    moved_grads = [task[i] for i in moved]
    if moved:
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(moved_grads)))
    else:
        grad_norm = torch.zeros((), device=loss.device)
    scale = rho / (grad_norm + NORM_EPS) - alpha
    # Multi-tensor ops instead of a loop over parameters (a handful of kernel launches on GPU, not
    # several per parameter), and no copy of θ: each moved parameter's data is swapped for a new
    # tensor θ + scale·g during the second pass, then the original tensor is put back -- exact.
    originals = [params[i].data for i in moved]
    with torch.no_grad():
        perturbed = torch._foreach_mul(moved_grads, scale)
        torch._foreach_add_(perturbed, originals)
    try:
        for i, value in zip(moved, perturbed):
            params[i].data = value
        del perturbed
        with frozen_bn_stats(model):
            perturbed_loss, flat = _forward_backward(model, batch, loss_fn, params)
    finally:
        for i, value in zip(moved, originals):
            params[i].data = value
    return TwoPassGradients(params, task, flat, loss, perturbed_loss, grad_norm.detach())


def combine(task: torch.Tensor | None, flat: torch.Tensor | None, weight: float) -> torch.Tensor | None:
    """``weight·(task + flat)`` with a missing gradient counted as zero (None if both missing)."""
    if task is None and flat is None:
        return None
    total = flat if task is None else task if flat is None else task + flat
    return total * weight


def combine_all(
    task: list[torch.Tensor | None], flat: list[torch.Tensor | None], weight: float
) -> list[torch.Tensor | None]:
    """``combine`` over aligned lists, with multi-tensor ops where both gradients exist."""
    out = [combine(g, f, weight) if g is None or f is None else None for g, f in zip(task, flat)]
    both = [i for i, (g, f) in enumerate(zip(task, flat)) if g is not None and f is not None]
    if both:
        sums = torch._foreach_add([task[i] for i in both], [flat[i] for i in both])
        torch._foreach_mul_(sums, weight)
        for i, total in zip(both, sums):
            out[i] = total
    return out


def apply_sagm_(result: TwoPassGradients, weight: float = 0.5) -> None:
    """Write SAGM's update direction ½(g + g') (``weight`` 1 for the plain sum) into ``.grad``."""
    for p, total in zip(result.params, combine_all(result.task, result.flat, weight)):
        p.grad = total
