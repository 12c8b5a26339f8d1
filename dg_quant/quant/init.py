"""Step-size initialisation: the LSQ rule and an MSE grid search (METHODS.md 1.4 and 2)."""

from __future__ import annotations

import math

import torch

MSE_GRID = 100
MSE_MAX_SAMPLES = 1 << 20


def _rows(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    return x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)


def lsq_step(x: torch.Tensor, qp: int, per_channel: bool) -> torch.Tensor:
    """s0 = 2 * mean|x| / sqrt(Q_P), per row (output channel) or for the whole tensor."""
    return 2 * _rows(x, per_channel).abs().mean(dim=1) / math.sqrt(qp)


def mse_step(x: torch.Tensor, qn: int, qp: int, per_channel: bool, grid: int = MSE_GRID) -> torch.Tensor:
    """The step whose clipping range minimises the squared quantization error, per row.

    Candidates clip at t_k = k/grid * max|x| (k = 1..grid); zero points are at zero, so a 1-D
    grid suffices. Large per-tensor inputs are subsampled to bound memory.
    """
    rows = _rows(x.float(), per_channel)
    if rows.shape[0] == 1 and rows.shape[1] > MSE_MAX_SAMPLES:
        idx = torch.randperm(rows.shape[1], device=rows.device)[:MSE_MAX_SAMPLES]
        rows = rows[:, idx]
    top = rows.abs().amax(dim=1).clamp_min(1e-8)
    best_err = torch.full_like(top, float("inf"))
    best_step = top / qp
    for k in range(1, grid + 1):
        step = (top * k / grid / qp).unsqueeze(1)
        err = ((torch.clamp(rows / step, -qn, qp).round() * step - rows) ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_step = torch.where(better, step.squeeze(1), best_step)
    return best_step


def init_step(x: torch.Tensor, method: str, qn: int, qp: int, per_channel: bool) -> torch.Tensor:
    """Initial step from data by ``method`` (``lsq`` or ``mse``), floored at a tiny positive value."""
    if method == "mse":
        step = mse_step(x, qn, qp, per_channel)
    else:
        step = lsq_step(x, qp, per_channel)
    return step.clamp_min(1e-8).to(x.dtype)
