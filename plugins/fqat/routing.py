"""How FQAT turns one step's g_QAT and g_flat into ``.grad`` (METHODS.md 7.4-7.6).

Weights, BN and the classifier always get w·(g_QAT + g_flat) (w = ½ as in SAGM's code). A scale
factor gets the same unless (part of) it is frozen: then the frozen entries get w·g_flat
(``drop_task_grad``) or nothing (``freeze_s``). ``alternate`` gives scale factors w·g_QAT on even
steps and w·g_flat on odd ones, with no freezing.
"""

from __future__ import annotations

import torch

from dg_quant.sharpness import combine


def scale_gradient(
    task: torch.Tensor | None,
    flat: torch.Tensor | None,
    frozen: torch.Tensor | None,
    *,
    weight: float = 0.5,
    freeze_mode: str = "drop_task_grad",
    update_mode: str = "joint",
    step: int = 0,
) -> torch.Tensor | None:
    """The gradient one scale factor receives; ``frozen`` is a bool mask (broadcastable) or None."""
    if update_mode == "alternate":
        chosen = task if step % 2 == 0 else flat
        return None if chosen is None else chosen * weight
    full = combine(task, flat, weight)
    if frozen is None or full is None:
        return full
    if freeze_mode == "freeze_s":
        if bool(frozen.all()):
            return None  # no update at all, not even from the optimizer's momentum
        return torch.where(frozen, torch.zeros_like(full), full)
    flat_only = torch.zeros_like(full) if flat is None else flat * weight
    return torch.where(frozen, flat_only, full)
