"""A SAGM-shaped two-pass step, used only when the real ``dg_quant.sagm``/``dg_quant.fqat`` is absent.

It costs what SAGM costs (Wang et al., CVPR 2023; docs/methods.md): a forward/backward at w, a
perturbation w + rho * g / ||g||, a second forward/backward there, the weights restored and the
two gradients combined as g_perturbed - alpha * g. Only its speed matters to the harness.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dg_quant.hookimpl import hookimpl


class TwoPassStep:
    """Replaces the ERM step (``dgq_compute_gradients`` is first-result) by two passes."""

    def __init__(self, rho: float = 0.05, alpha: float = 0.001) -> None:
        self.rho, self.alpha = rho, alpha

    @hookimpl
    def dgq_compute_gradients(self, model: nn.Module, batch: tuple, loss_fn: Any) -> dict[str, Any]:
        x, y = batch
        loss = loss_fn(model(x), y)
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            first = torch._foreach_mul(grads, 1.0)
            eps = torch._foreach_mul(grads, self.rho / (norm + 1e-12))
            torch._foreach_add_(params, eps)
        for p in params:
            p.grad = None
        perturbed = loss_fn(model(x), y)
        perturbed.backward()
        with torch.no_grad():
            torch._foreach_sub_(params, eps)
            torch._foreach_add_([p.grad for p in params], first, alpha=-self.alpha)
        return {"loss": loss.detach(), "perturbed_loss": perturbed.detach()}
