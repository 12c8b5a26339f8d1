"""Filter-normalised loss surfaces (Li et al. 2018)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dg_quant.analysis.perturb import batch_evaluator, perturbable_parameters
from dg_quant.analysis.surface import (
    filter_normalized_direction,
    grid,
    loss_surface_1d,
    loss_surface_2d,
)
from dg_quant.errors import ConfigError
from dg_quant.quant import QuantConfig, quantize_, step_parameters
from dg_quant.registry import create_adapter


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return create_adapter("test_cnn", num_classes=3, in_channels=1, width=4).eval()


def test_directions_match_filter_norms_and_skip_bias_and_bn():
    model = tiny_model()
    params = perturbable_parameters(model)
    direction = filter_normalized_direction(params, torch.Generator().manual_seed(0))
    for (name, p), d in zip(params, direction):
        if p.dim() <= 1:
            assert torch.count_nonzero(d) == 0, name
        else:
            assert torch.allclose(d.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1), rtol=1e-4), name


def test_surfaces_pass_through_the_trained_point():
    model = tiny_model()
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,)))]
    evaluate = batch_evaluator(batches)
    base = evaluate(model)["loss"]
    one = loss_surface_1d(model, evaluate, grid(1.0, 5))
    assert one["alpha"].tolist() == pytest.approx([-1, -0.5, 0, 0.5, 1])
    assert one.loc[one.alpha == 0, "loss"].item() == pytest.approx(base)
    assert not np.allclose(one["loss"], base)
    two = loss_surface_2d(model, evaluate, grid(1.0, 3), grid(0.5, 3))
    assert len(two) == 9
    assert two.loc[(two.alpha == 0) & (two.beta == 0), "loss"].item() == pytest.approx(base)
    assert evaluate(model)["loss"] == pytest.approx(base)  # model restored


def test_steps_only_moves_only_the_step_sizes():
    model = quantize_(tiny_model(), QuantConfig())
    steps = {id(p) for p in step_parameters(model)}
    seen = []

    def spy(m: nn.Module) -> dict[str, float]:
        seen.append({n: p.detach().clone() for n, p in m.named_parameters()})
        return {"loss": 0.0, "acc": 0.0}

    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_surface_1d(model, spy, [0.5], only_steps=True)
    by_id = {n: id(p) for n, p in model.named_parameters()}
    moved = {n for n, v in seen[0].items() if not torch.equal(v, original[n])}
    assert moved and all(by_id[n] in steps for n in moved)
    with pytest.raises(ConfigError):
        loss_surface_1d(tiny_model(), spy, [0.5], only_steps=True)
    with pytest.raises(ConfigError):
        grid(1.0, 1)
