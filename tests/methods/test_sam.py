"""SAM's gradient against the two passes written out with autograd."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dg_quant.methods.sam import sam_gradients_


def test_sam_gradient_is_the_gradient_at_the_ascent_point() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    loss_fn = nn.CrossEntropyLoss()
    reference = copy.deepcopy(model)
    rho = 0.1

    # by hand: g at theta, theta' = theta + rho g / ||g||, gradient at theta' (BN stats of pass 1 only)
    loss = loss_fn(reference(batch[0]), batch[1])
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    moved = copy.deepcopy(reference)
    with torch.no_grad():
        for p, g in zip(moved.parameters(), grads):
            p.add_(rho * g / norm)
    expected = torch.autograd.grad(loss_fn(moved(batch[0]), batch[1]), list(moved.parameters()))

    before = [p.detach().clone() for p in model.parameters()]
    metrics = sam_gradients_(model, batch, loss_fn, rho)
    for p, e, b in zip(model.parameters(), expected, before):
        assert torch.allclose(p.grad, e, atol=1e-6)
        assert torch.equal(p.detach(), b)  # parameters restored exactly
    assert torch.equal(model[1].running_mean, reference[1].running_mean)  # one BN update, as the clean pass
    assert float(metrics["sam/perturbed_loss"]) >= float(metrics["loss"]) - 1e-6
