"""Uniform weight averages of a model's parameters, and BatchNorm statistics recomputed for one.

Shared by SWA (Izmailov et al., 2018) and SWAD (Cha et al., 2021). An average holds float32 copies of
the parameters only (``model.named_parameters()``: weights, biases, BN affines and, on a
quantized model, the latent weights and LSQ step sizes), as ``torch.optim.swa_utils.AveragedModel``
and SWAD's copy of it do; buffers are not averaged, BatchNorm running statistics are recomputed
as ``torch.optim.swa_utils.update_bn`` does instead (frozen BatchNorm layers excepted).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dg_quant.errors import ConfigError
from dg_quant.options import option
from dg_quant.quant.inq import iter_inq_layers


class ParameterAverage:
    """Running mean of parameter snapshots: ``mean_k = mean_{k-1} + (x_k - mean_{k-1}) / k``."""

    def __init__(self) -> None:
        self.mean: dict[str, torch.Tensor] = {}
        self.count = 0
        self.start_step: int | None = None
        self.end_step: int | None = None

    def add(self, params: dict[str, torch.Tensor], step: int | None = None, weight: int = 1) -> None:
        """Add a snapshot counted ``weight`` times (a segment average counts once in SWAD)."""
        if self.count == 0:
            # kept on the snapshot's device: a segment averaged every step on the GPU costs no copies
            self.mean = {k: v.detach().to(dtype=torch.float32, copy=True) for k, v in params.items()}
        else:
            if params.keys() != self.mean.keys():
                raise ValueError("parameter names changed between snapshots of the average")
            total = self.count + weight
            with torch.no_grad():
                for k, v in params.items():
                    mean = self.mean[k]
                    mean.add_((v.detach().to(mean.device, torch.float32) - mean) * (weight / total))
        self.count += weight
        if step is not None:
            self.start_step = step if self.start_step is None else self.start_step
            self.end_step = step

    def add_average(self, other: ParameterAverage) -> None:
        """Add ``other``'s mean as one snapshot (SWAD averages segment averages uniformly)."""
        start = self.start_step
        self.add(other.mean, other.end_step)
        self.start_step = other.start_step if start is None else start

    def cpu(self) -> ParameterAverage:
        """Move the mean to the CPU (a finished segment waits there); returns self."""
        self.mean = {k: v.cpu() for k, v in self.mean.items()}
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "count": self.count, "start_step": self.start_step, "end_step": self.end_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = {k: v.clone() for k, v in state["mean"].items()}
        self.count = int(state["count"])
        self.start_step, self.end_step = state["start_step"], state["end_step"]


def parameters_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an average takes from ``model``: its floating-point parameters by name."""
    return {k: p for k, p in model.named_parameters() if p.is_floating_point()}


@torch.no_grad()
def load_average_(model: nn.Module, average: ParameterAverage) -> None:
    """Copy the averaged parameters into ``model`` (buffers and quantizer flags stay the model's).

    Weights INQ has frozen onto its power-of-two grid keep their grid value: an average over a
    window in which a partition froze would leave the grid (when every partition froze before
    the window, as at the end of an INQ run, the two agree).
    """
    params = dict(model.named_parameters())
    missing = sorted(set(average.mean) - set(params))
    if missing:
        raise ValueError(f"the average holds parameters the model lacks: {', '.join(missing[:3])}")
    kept = [
        (layer.module.weight, layer.frozen, layer.module.weight.detach().clone()) for layer in iter_inq_layers(model)
    ]
    for name, value in average.mean.items():
        params[name].copy_(value.to(params[name].device, params[name].dtype))
    for weight, frozen, value in kept:
        weight[frozen] = value[frozen]


@torch.no_grad()
def recompute_bn_(model: nn.Module, batches: Iterable[Any], device: torch.device | None = None) -> None:
    """Reset BatchNorm running statistics and re-estimate them (cumulative mean) over ``batches``.

    ``torch.optim.swa_utils.update_bn``: the step SWA and SWAD take after averaging, because the
    running statistics of the averaged weights are not the average of the running statistics.
    Only the BatchNorm layers that train in training mode are re-estimated: a backbone that keeps
    its BatchNorm frozen (DomainBed's ``freeze_bn``, whose ``train()`` leaves BN in eval mode) keeps
    its statistics, as SWAD skips ``update_bn`` with ``freeze_bn`` (``update_bn`` would reset them and
    then never update them).
    """
    was_training = model.training
    model.train()
    active = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    momenta = {m: m.momentum for m in active}
    try:
        if not active:
            return
        for module in active:
            module.reset_running_stats()
            module.momentum = None  # a cumulative mean over the batches
        for batch in batches:
            x = batch[0] if isinstance(batch, list | tuple) else batch
            model(x.to(device) if device is not None else x)
    finally:
        for module, momentum in momenta.items():
            module.momentum = momentum
        model.train(was_training)


@dataclass
class BNOptions:
    """How the averaged model's BatchNorm statistics are recomputed (flag ``--bn_batches``)."""

    bn_batches: int = option(
        500, "training batches that re-estimate the averaged model's BatchNorm statistics (SWAD: 500)"
    )

    def __post_init__(self) -> None:
        if self.bn_batches < 1:
            raise ConfigError(f"--bn_batches must be >= 1; got {self.bn_batches}")


def finish_average_(
    model: nn.Module, average: ParameterAverage, batches: Iterable[Any], device: torch.device | None = None
) -> None:
    """Load ``average`` into ``model`` and recompute its BatchNorm statistics over ``batches``."""
    load_average_(model, average)
    recompute_bn_(model, batches, device)
