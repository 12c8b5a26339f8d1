"""How FQAT turns one step's g_QAT and g_flat into ``.grad`` (docs/methods.md 7.4-7.6).

Weights, BN and the classifier always get w·(g_QAT + g_flat) (w = ½ as in SAGM's code). A scale
factor gets the same unless (part of) it is frozen: then the frozen entries get w·g_flat
(``drop_task_grad``) or nothing (``freeze_s``). ``alternate`` gives scale factors w·g_QAT on even
steps and w·g_flat on odd ones, with no freezing.
"""

from __future__ import annotations

import torch

from dg_quant.sharpness import combine, combine_all


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


def scale_gradients(
    task: list[torch.Tensor | None],
    flat: list[torch.Tensor | None],
    frozen: list[torch.Tensor | None],
    *,
    weight: float = 0.5,
    freeze_mode: str = "drop_task_grad",
    update_mode: str = "joint",
    step: int = 0,
) -> list[torch.Tensor | None]:
    """``scale_gradient`` for every scale factor of a step; the unfrozen ones (most of them) in
    multi-tensor ops, the frozen ones one by one. Bit for bit the same gradients."""
    if update_mode == "alternate":
        return [
            scale_gradient(g, f, None, weight=weight, update_mode=update_mode, step=step) for g, f in zip(task, flat)
        ]
    out = combine_all(task, flat, weight)
    for i, mask in enumerate(frozen):
        if mask is not None:
            out[i] = scale_gradient(
                task[i], flat[i], mask, weight=weight, freeze_mode=freeze_mode, update_mode=update_mode, step=step
            )
    return out
