"""Filter-normalised loss surfaces (Li et al., 2018), as FQAT plots them (docs/methods.md 9).

A direction is Gaussian, rescaled per filter (output channel) to the norm of that filter, so that
the plot is comparable across layers and networks of different weight scale; 1-D parameters
(biases, BatchNorm affine) get zero (``--xignore biasbn``). LSQ step sizes are left alone, or,
with ``only_steps``, they are the only thing moved (the FQAT author's ``disturb_s``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from dg_quant.analysis.perturb import (
    Evaluator,
    NamedParams,
    check_unchanged,
    offset,
    perturbable_parameters,
    state_fingerprint,
)
from dg_quant.errors import ConfigError


def filter_normalized_direction(
    params: NamedParams, generator: torch.Generator, ignore_1d: bool = True
) -> list[torch.Tensor]:
    """Gaussian direction with ``||d_i|| = ||theta_i||`` for every filter i of every tensor."""
    direction = []
    for _, p in params:
        d = torch.randn(p.shape, generator=generator).to(device=p.device, dtype=p.dtype)
        if p.dim() <= 1:
            if ignore_1d:
                d.zero_()
            else:
                d.mul_(p.detach().norm() / (d.norm() + 1e-10))
        else:
            p_norm = p.detach().flatten(1).norm(dim=1)
            d_norm = d.flatten(1).norm(dim=1)
            d.mul_((p_norm / (d_norm + 1e-10)).view(-1, *([1] * (p.dim() - 1))))
        direction.append(d)
    return direction


def _params(model: nn.Module, only_steps: bool) -> NamedParams:
    return perturbable_parameters(model, only_steps=only_steps)


def grid(span: float, points: int) -> np.ndarray:
    """``points`` evenly spaced coefficients over ``[-span, span]`` (0 included when odd)."""
    if points < 2 or span <= 0:
        raise ConfigError(f"a surface needs >= 2 points and a positive span; got {points} points, span {span}")
    return np.linspace(-span, span, points)


def loss_surface_1d(
    model: nn.Module, evaluate: Evaluator, alphas: Sequence[float], seed: int = 0, only_steps: bool = False
) -> pd.DataFrame:
    """``L(theta + a * d)`` for each ``a`` (one row each: alpha, loss, acc)."""
    params = _params(model, only_steps)
    before = state_fingerprint(model)
    d = filter_normalized_direction(params, torch.Generator().manual_seed(seed), ignore_1d=not only_steps)
    rows = []
    for a in alphas:
        with offset(params, [d], [float(a)]):
            rows.append({"alpha": float(a), **evaluate(model)})
    check_unchanged(model, before)
    return pd.DataFrame(rows)


def loss_surface_2d(
    model: nn.Module,
    evaluate: Evaluator,
    alphas: Sequence[float],
    betas: Sequence[float],
    seed: int = 0,
    only_steps: bool = False,
) -> pd.DataFrame:
    """``L(theta + a * d1 + b * d2)`` on the grid (one row per point: alpha, beta, loss, acc)."""
    params = _params(model, only_steps)
    before = state_fingerprint(model)
    generator = torch.Generator().manual_seed(seed)
    d1 = filter_normalized_direction(params, generator, ignore_1d=not only_steps)
    d2 = filter_normalized_direction(params, generator, ignore_1d=not only_steps)
    rows = []
    for a in alphas:
        for b in betas:
            with offset(params, [d1, d2], [float(a), float(b)]):
                rows.append({"alpha": float(a), "beta": float(b), **evaluate(model)})
    check_unchanged(model, before)
    return pd.DataFrame(rows)
