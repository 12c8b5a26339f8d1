"""SWAD local flatness: exact on a quadratic; around a trained model, equal to F_gamma written out."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dg_quant.adapters.wilds.checkpoints import eval_loader, load_run_model
from dg_quant.analysis.flatness import flatness_summary, local_flatness, unit_direction
from dg_quant.analysis.perturb import batch_evaluator, cached_batches, perturbable_parameters
from dg_quant.errors import ConfigError
from dg_quant.quant import QuantConfig, quantize_, step_parameters


class Bowl(nn.Module):
    """Loss ||w||^2 with the minimum at w = 0: F_gamma is gamma^2 in every direction."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(7))
        self.b = nn.Parameter(torch.zeros(3, 2))


def bowl_loss(model: nn.Module) -> dict[str, float]:
    return {"loss": float(sum((p.detach() ** 2).sum() for p in model.parameters()))}


def test_f_gamma_is_exact_on_a_quadratic_bowl():
    radii = [0.0, 0.5, 1.0, 3.0]
    summary = flatness_summary(local_flatness(Bowl(), {"all": bowl_loss}, radii, n_directions=5))
    assert summary["f_gamma"].tolist() == pytest.approx([r**2 for r in radii], rel=1e-5)
    assert summary["f_std"].tolist() == pytest.approx([0.0] * 4, abs=1e-5)
    assert summary["directions"].tolist() == [5] * 4


def test_directions_have_unit_norm_over_all_parameters():
    params = perturbable_parameters(Bowl())
    d = unit_direction(params, torch.Generator().manual_seed(3))
    assert sum(float((t**2).sum()) for t in d) == pytest.approx(1.0)
    assert [t.shape for t in d] == [p.shape for _, p in params]


def test_step_sizes_are_excluded_unless_asked():
    model = quantize_(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2)), QuantConfig())
    steps = {id(p) for p in step_parameters(model)}
    assert steps
    assert not steps & {id(p) for _, p in perturbable_parameters(model)}
    assert steps <= {id(p) for _, p in perturbable_parameters(model, include_steps=True)}


def test_bad_settings():
    with pytest.raises(ConfigError):
        local_flatness(Bowl(), {"all": bowl_loss}, [0, 1], n_directions=0)
    with pytest.raises(ConfigError):
        local_flatness(Bowl(), {"all": bowl_loss}, [-1])


def independent_f_gamma(model: nn.Module, evaluators, radius: float, n_directions: int, seed: int) -> dict:
    """F_gamma written out: for each Gaussian direction over the trainable non-step parameters
    (float64, one unit norm over all of them), a perturbed deep copy's loss minus the model's."""
    import copy

    steps = {id(p) for p in step_parameters(model)}
    generator = torch.Generator().manual_seed(seed)
    base = {split: evaluate(model)["loss"] for split, evaluate in evaluators.items()}
    totals = dict.fromkeys(evaluators, 0.0)
    for _ in range(n_directions):
        params = [p for p in model.parameters() if p.requires_grad and id(p) not in steps]
        noise = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
        norm = float(sum((n**2).sum() for n in noise)) ** 0.5
        moved = copy.deepcopy(model)
        moved_steps = {id(p) for p in step_parameters(moved)}
        moved_params = [p for p in moved.parameters() if p.requires_grad and id(p) not in moved_steps]
        with torch.no_grad():
            for p, n in zip(moved_params, noise):
                p.add_((radius * n / norm).to(p.dtype))
        for split, evaluate in evaluators.items():
            totals[split] += evaluate(moved)["loss"] - base[split]
    return {split: total / n_directions for split, total in totals.items()}


def test_flatness_around_a_trained_quantized_model(tiny_runs):
    loaded = load_run_model(tiny_runs["qtdog"])
    dataset = loaded.load_dataset()
    evaluators = {
        s: batch_evaluator(cached_batches(eval_loader(dataset, s, loaded.model), max_batches=1))
        for s in ("id_val", "test")
    }
    before = [p.detach().clone() for p in loaded.model.parameters()]
    samples = local_flatness(loaded.model, evaluators, [0.0, 1.0, 3.0], n_directions=4, seed=1)
    summary = flatness_summary(samples).set_index(["split", "radius"])
    expected = independent_f_gamma(loaded.model, evaluators, radius=3.0, n_directions=4, seed=1)
    for split in ("id_val", "test"):
        assert summary.loc[(split, 3.0), "f_gamma"] == pytest.approx(expected[split], rel=1e-4)
        assert summary.loc[(split, 3.0), "f_gamma"] > 0.0  # the loss rises away from the trained weights
        assert summary.loc[(split, 0.0), "loss"] == pytest.approx(evaluators[split](loaded.model)["loss"])
    assert all(torch.equal(a, b) for a, b in zip(before, loaded.model.parameters()))
