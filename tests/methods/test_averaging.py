"""Weight averages, SWAD's loss valley and BN recomputation against computations written here."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from dg_quant.methods.averaging import ParameterAverage, load_average_, parameters_of, recompute_bn_
from dg_quant.methods.swad import LossValley, Segment


def test_running_mean_is_the_mean() -> None:
    snaps = [{"w": torch.randn(3, 2), "b": torch.randn(2)} for _ in range(5)]
    average = ParameterAverage()
    for step, s in enumerate(snaps):
        average.add(s, step=step)
    assert torch.allclose(average.mean["w"], torch.stack([s["w"] for s in snaps]).mean(0), atol=1e-6)
    assert (average.count, average.start_step, average.end_step) == (5, 0, 4)
    clone = ParameterAverage()
    clone.load_state_dict(average.state_dict())
    assert torch.equal(clone.mean["b"], average.mean["b"])


def reference_valley(losses: list[float], n_conv: int, n_tol: int, ratio: float) -> list[int]:
    """SWAD's rule written from its description: which segments the final average holds."""
    n = len(losses)
    starts = [c for c in range(n - n_conv + 1) if losses[c] <= min(losses[c : c + n_conv])]
    if not starts:
        return [n - 1]
    c = starts[0]
    threshold = np.mean(losses[c : c + n_conv]) * (1 + ratio)
    chosen = [c]
    for k in range(c - 1, max(c - (n_tol - n_conv), 0) - 1, -1):
        if losses[k] > threshold:
            break
        chosen.insert(0, k)
    for k in range(c + 1, n):
        window = losses[k : k + n_tol]
        if min(window) > threshold:
            break
        chosen.append(k)
    return chosen


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize(("n_conv", "n_tol"), [(3, 6), (3, 3), (4, 2)])
def test_loss_valley_against_reference(seed: int, n_conv: int, n_tol: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 16))
    # a valley: the loss falls, stays low, then may rise again; noise makes ties and dips happen
    losses = list(np.abs(np.concatenate([np.linspace(2, 0.5, n // 2), np.linspace(0.5, 1.5, n - n // 2)])))
    losses = [float(v + rng.normal(0, 0.3)) for v in losses]
    segments = []
    valley = LossValley(n_conv, n_tol, 0.3)
    for i, loss in enumerate(losses):
        average = ParameterAverage()
        average.add({"w": torch.tensor([float(i), 2.0 * i])}, step=i)
        segments.append(average)
        valley.update(Segment(average, loss))
        if i == n // 2:  # a checkpoint in the middle restores the same rule state
            restored = LossValley(n_conv, n_tol, 0.3)
            restored.load_state_dict(copy.deepcopy(valley.state_dict()))
            valley = restored
    final = valley.final()
    chosen = reference_valley(losses, n_conv, n_tol, 0.3)
    expected = torch.stack([segments[i].mean["w"] for i in chosen]).mean(0)
    assert torch.allclose(final.mean["w"], expected, atol=1e-6)
    if valley.is_converged:
        assert valley.chosen == chosen


def test_dead_valley_stops_adding() -> None:
    valley = LossValley(2, 2, 0.1)
    for i, loss in enumerate([1.0, 1.0, 0.5, 0.6, 0.55, 3.0, 3.0, 0.1, 0.1]):
        average = ParameterAverage()
        average.add({"w": torch.tensor([float(i)])}, step=i)
        valley.update(Segment(average, loss))
    assert valley.dead_valley
    assert valley.chosen == reference_valley([1.0, 1.0, 0.5, 0.6, 0.55, 3.0, 3.0, 0.1, 0.1], 2, 2, 0.1)


def test_load_average_and_bn_recompute() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    average = ParameterAverage()
    average.add(parameters_of(model))
    average.add({k: torch.ones_like(v) for k, v in parameters_of(model).items()})
    target = {k: (v.detach() + 1) / 2 for k, v in parameters_of(model).items()}
    load_average_(model, average)
    assert all(torch.allclose(p, target[k]) for k, p in model.named_parameters())
    data = [torch.randn(8, 1, 3, 3) * 2 + 5 for _ in range(4)]
    recompute_bn_(model, data)
    with torch.no_grad():
        conv_out = torch.cat([model[0](x) for x in data])
    bn = model[1]
    assert torch.allclose(bn.running_mean, conv_out.mean((0, 2, 3)), atol=1e-4)
    per_batch_var = torch.stack([model[0](x).detach().var((0, 2, 3), unbiased=True) for x in data]).mean(0)
    assert torch.allclose(bn.running_var, per_batch_var, atol=1e-4)  # cumulative mean of batch variances


def test_bn_recompute_keeps_frozen_batchnorm() -> None:
    """A backbone whose train() keeps BatchNorm in eval mode (DomainBed's freeze_bn) keeps its
    statistics: resetting them and never updating them would leave mean 0, variance 1."""

    class Frozen(nn.Sequential):
        def train(self, mode: bool = True) -> Frozen:
            super().train(mode)
            self[1].eval()
            return self

    model = nn.Sequential(Frozen(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)), nn.BatchNorm2d(2))
    frozen, trained = model[0][1], model[1]
    frozen.running_mean.fill_(3.0)
    data = [torch.randn(8, 1, 3, 3) + 5 for _ in range(3)]
    model.eval()
    recompute_bn_(model, data)
    assert torch.equal(frozen.running_mean, torch.full((2,), 3.0)) and int(frozen.num_batches_tracked) == 0
    assert int(trained.num_batches_tracked) == 3 and not torch.equal(trained.running_mean, torch.zeros(2))
    assert not model.training and trained.momentum == 0.1  # mode and momentum restored
