"""SAM (Foret et al., ICLR 2021): descend with the gradient taken at the worst nearby point.

The step's gradient is g' = grad L(theta + rho * g / ||g||), g = grad L(theta), with ||g|| the global
norm over all parameters (SAM's non-adaptive variant). The two passes are SAGM's
(``dg_quant.sharpness.sagm_gradients`` with alpha = 0): BatchNorm running statistics are left
unchanged by the perturbed pass and the parameters are restored exactly.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dg_quant.sharpness import sagm_gradients


def sam_gradients_(model: nn.Module, batch: tuple[Any, Any], loss_fn: Any, rho: float) -> dict[str, Any]:
    """Write SAM's g' into ``.grad`` of ``model``'s parameters; returns the step's metrics."""
    result = sagm_gradients(model, batch, loss_fn, rho, alpha=0.0)
    for p, g in zip(result.params, result.flat):
        p.grad = g
    return {
        "loss": result.loss,
        "sam/perturbed_loss": result.perturbed_loss,
        "sam/sharpness": result.perturbed_loss - result.loss,
        "sam/grad_norm": result.grad_norm,
    }
