"""Step-size initialisation: the LSQ rule and an MSE search (docs/methods.md 1.4 and 2)."""

from __future__ import annotations

import math

import torch

MSE_GRID = 100  # coarse candidates, k/MSE_GRID of the row's min-max step
MSE_BRACKETS = 3  # best coarse candidates refined (the error is not unimodal in the step)
MSE_FINE = 16  # fine candidates across each bracket (two coarse intervals)
MSE_LLOYD = 8  # least-squares step / re-round rounds at the end (each can only lower the error)
MSE_MAX_SAMPLES = 1 << 20


def _rows(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    return x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)


def lsq_step(x: torch.Tensor, qp: int, per_channel: bool) -> torch.Tensor:
    """s0 = 2 * mean|x| / sqrt(Q_P), per row (output channel) or for the whole tensor."""
    return 2 * _rows(x, per_channel).abs().mean(dim=1) / math.sqrt(qp)


def quant_error(rows: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """Σ (x − Q(x))² per row of ``rows`` [R, K] for one step per row ``step`` [R]."""
    s = step.unsqueeze(1)
    return (torch.clamp(rows / s, -qn, qp).round_().mul_(s).sub_(rows)).square_().sum(dim=1)


def _best_of(rows: torch.Tensor, candidates: torch.Tensor, qn: int, qp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(error [R, C], candidates [R, C]) for candidate steps ``candidates`` [R, C], one pass each."""
    errors = torch.stack([quant_error(rows, candidates[:, c], qn, qp) for c in range(candidates.shape[1])], dim=1)
    return errors, candidates


def _lloyd(
    rows: torch.Tensor, step: torch.Tensor, err: torch.Tensor, qn: int, qp: int, rounds: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternate codes = round(clip(x/s)) and s = Σxq/Σq² (least squares for fixed codes).

    Each half-step minimises the error over one of the two, so a round never raises it; a row
    keeps its previous step whenever the new one is not better (float noise).
    """
    for _ in range(rounds):
        q = torch.clamp(rows / step.unsqueeze(1), -qn, qp).round_()
        norm = q.square().sum(dim=1)
        proposal = torch.where(norm > 0, (rows * q).sum(dim=1) / norm.clamp_min(1e-30), step)
        proposal = proposal.clamp_min(1e-12)
        new_err = quant_error(rows, proposal, qn, qp)
        better = new_err < err
        if not bool(better.any()):
            break
        step, err = torch.where(better, proposal, step), torch.where(better, new_err, err)
    return step, err


def mse_step(x: torch.Tensor, qn: int, qp: int, per_channel: bool, grid: int = MSE_GRID) -> torch.Tensor:
    """The step that minimises the squared quantization error Σ(x − Q(x))², per row.

    Zero points are at zero, so the search is 1-D in the step. The error is piecewise quadratic
    with a kink wherever an element crosses a rounding boundary, so no single local search is
    safe: a coarse grid k/grid · max|x|/Q_P (k = 1..grid, the white paper's grid) picks the
    ``MSE_BRACKETS`` best candidates, a fine grid across each bracket (±1 coarse interval) picks
    the best of those, and a few least-squares/re-round rounds polish it (never worse). At 7 bits
    the coarse grid alone is up to 1.2x off a brute-force optimum; this search is within a
    fraction of a percent (tests/quant/test_init.py). Computed and returned in float32; large
    per-tensor inputs are subsampled to bound memory and time.
    """
    dtype = torch.float32  # what the quantizers store: the step is exact when they copy it
    rows = _rows(x.to(dtype), per_channel)
    if rows.shape[0] == 1 and rows.shape[1] > MSE_MAX_SAMPLES:
        idx = torch.randperm(rows.shape[1], device=rows.device)[:MSE_MAX_SAMPLES]
        rows = rows[:, idx]
    unit = rows.abs().amax(dim=1).clamp_min(1e-8) / qp / grid  # one coarse interval [R]
    ks = torch.arange(1, grid + 1, device=rows.device, dtype=dtype)
    coarse, _ = _best_of(rows, unit.unsqueeze(1) * ks, qn, qp)
    picks = coarse.topk(min(MSE_BRACKETS, grid), dim=1, largest=False).indices + 1  # k of the best [R, B]
    offsets = torch.linspace(-1.0, 1.0, MSE_FINE + 2, device=rows.device, dtype=dtype)[1:-1]
    centres = picks.to(dtype).unsqueeze(2) + offsets  # [R, B, F], in coarse intervals
    fine = (centres.clamp_min(1.0 / MSE_FINE) * unit.reshape(-1, 1, 1)).reshape(rows.shape[0], -1)
    candidates = torch.cat([unit.unsqueeze(1) * picks.to(dtype), fine], dim=1)
    errors = torch.cat([coarse.gather(1, picks - 1), _best_of(rows, fine, qn, qp)[0]], dim=1)
    best = errors.argmin(dim=1, keepdim=True)
    step, err = candidates.gather(1, best).squeeze(1), errors.gather(1, best).squeeze(1)
    step, _ = _lloyd(rows, step, err, qn, qp, MSE_LLOYD)
    return step


def init_step(x: torch.Tensor, method: str, qn: int, qp: int, per_channel: bool) -> torch.Tensor:
    """Initial step from data by ``method`` (``lsq`` or ``mse``), floored at a tiny positive value."""
    if method == "mse":
        step = mse_step(x, qn, qp, per_channel)
    else:
        step = lsq_step(x, qp, per_channel)
    return step.clamp_min(1e-8).to(x.dtype)
