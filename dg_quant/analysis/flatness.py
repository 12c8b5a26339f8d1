"""SWAD local flatness (Cha et al., 2021): F_gamma(w) = E_{||w' - w|| = gamma}[L(w') - L(w)].

Monte Carlo as the SWAD reference script (docs/methods.md 8): each direction is a Gaussian vector over
all selected parameters, normalised to unit L2 norm as one vector (no per-filter scaling); the
model is evaluated in eval mode at ``w + gamma * d`` for every radius; buffers are not moved.
LSQ step sizes are excluded by default, so a quantized model's latent weights move and are
re-quantized in the forward.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

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


def unit_direction(params: NamedParams, generator: torch.Generator) -> list[torch.Tensor]:
    """A Gaussian direction shaped like ``params`` with unit L2 norm over all of them together."""
    direction = [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.device) for _, p in params]
    norm = math.sqrt(sum(float((d**2).sum()) for d in direction))
    return [(d / norm).to(p.dtype) for d, (_, p) in zip(direction, params)]


def local_flatness(
    model: nn.Module,
    evaluators: Mapping[str, Evaluator],
    radii: Sequence[float],
    n_directions: int = 100,
    include_steps: bool = False,
    seed: int = 0,
) -> pd.DataFrame:
    """Raw Monte-Carlo samples: one row per (split, direction, radius) with loss, acc and the
    loss increase ``delta`` over the unperturbed model; summarise with ``flatness_summary``."""
    if n_directions < 1:
        raise ConfigError(f"the number of directions must be positive; got {n_directions}")
    if any(r < 0 for r in radii):
        raise ConfigError(f"radii must be non-negative; got {list(radii)}")
    params = perturbable_parameters(model, include_steps=include_steps)
    before = state_fingerprint(model)
    base = {split: evaluate(model) for split, evaluate in evaluators.items()}
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n_directions):
        direction = unit_direction(params, generator)
        for radius in radii:
            if radius == 0:
                results = base
            else:
                with offset(params, [direction], [float(radius)]):
                    results = {split: evaluate(model) for split, evaluate in evaluators.items()}
            for split, metrics in results.items():
                rows.append(
                    {
                        "split": split,
                        "direction": i,
                        "radius": float(radius),
                        "loss": metrics["loss"],
                        "acc": metrics.get("acc"),
                        "delta": metrics["loss"] - base[split]["loss"],
                    }
                )
    check_unchanged(model, before)
    return pd.DataFrame(rows)


def flatness_summary(samples: pd.DataFrame) -> pd.DataFrame:
    """F_gamma per split and radius: mean loss increase with its standard error over directions."""
    grouped = samples.groupby(["split", "radius"], sort=True)
    summary = grouped.agg(
        f_gamma=("delta", "mean"),
        f_std=("delta", "std"),
        loss=("loss", "mean"),
        acc=("acc", "mean"),
        directions=("delta", "size"),
    ).reset_index()
    summary["f_std"] = summary["f_std"].fillna(0.0)
    summary["f_stderr"] = summary["f_std"] / summary["directions"] ** 0.5
    return summary
