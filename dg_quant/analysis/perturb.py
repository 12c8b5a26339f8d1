"""Shared pieces of the flatness and loss-surface analyses: which parameters to move, moving
them temporarily, and evaluating loss and accuracy on fixed batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from dg_quant.errors import ConfigError
from dg_quant.quant import step_parameters

Evaluator = Callable[[nn.Module], dict[str, float]]
NamedParams = list[tuple[str, nn.Parameter]]


def perturbable_parameters(model: nn.Module, include_steps: bool = False, only_steps: bool = False) -> NamedParams:
    """``named_parameters()`` minus the LSQ step sizes (the default, docs/methods.md 8), or plus them,
    or only them. For a quantized model these are the latent weights, re-quantized in the forward."""
    steps = {id(p) for p in step_parameters(model)}
    if only_steps:
        chosen = [(n, p) for n, p in model.named_parameters() if id(p) in steps]
        if not chosen:
            raise ConfigError("the model has no quantizer step sizes to perturb; drop the steps-only option")
        return chosen
    return [(n, p) for n, p in model.named_parameters() if include_steps or id(p) not in steps]


@contextmanager
def offset(params: NamedParams, directions: Sequence[Sequence[torch.Tensor]], coefs: Sequence[float]) -> Iterator[None]:
    """Temporarily set each parameter to ``theta + sum_k coefs[k] * directions[k]``; restores exactly."""
    saved = [p.detach().clone() for _, p in params]
    try:
        with torch.no_grad():
            for i, (_, p) in enumerate(params):
                delta = sum(c * d[i] for c, d in zip(coefs, directions) if c)
                if isinstance(delta, torch.Tensor):
                    p.add_(delta.to(p.dtype))
        yield
    finally:
        with torch.no_grad():
            for (_, p), original in zip(params, saved):
                p.copy_(original)


def cached_batches(loader: Iterable, device: str | torch.device = "cpu", max_batches: int | None = None) -> list:
    """``(x, y)`` pairs of a loader, on ``device``, kept so repeated evaluations see the same data."""
    batches = []
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batches.append((batch[0].to(device), batch[1].to(device)))
    if not batches:
        raise ConfigError("the evaluation split is empty; choose a split that holds examples")
    return batches


def batch_evaluator(batches: list) -> Evaluator:
    """Mean cross-entropy and accuracy over ``batches`` in eval mode (BN statistics untouched)."""

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        loss, correct, count = 0.0, 0, 0
        for x, y in batches:
            logits = model(x)
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
            count += len(y)
        model.train(was_training)
        return {"loss": loss / count, "acc": correct / count}

    return evaluate


def state_fingerprint(model: nn.Module) -> list[torch.Tensor]:
    """Copies of every parameter and buffer, to check that an analysis left the model unchanged."""
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


def check_unchanged(model: nn.Module, before: list[torch.Tensor]) -> None:
    after = list(model.parameters()) + list(model.buffers())
    if len(after) != len(before) or any(not torch.equal(a, b) for a, b in zip(after, before)):
        raise RuntimeError("the analysed model changed during the analysis")  # a bug, not user input
