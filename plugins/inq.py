"""INQ (Zhou et al., ICLR 2017) as a plugin: partitions of weights frozen onto powers of two.

``--plugin dg_quant.inq --bits 7`` spreads the partitions (default 0.5, 0.75, 0.875, 1.0 of each
weight tensor, largest magnitudes first) evenly over the run from ``--inq_start_step``. A frozen
weight never changes again: its gradient is masked before the optimizer step, its exact value
is kept aside, and after the step that value is written back and its optimizer state (momentum,
Adam moments) is zeroed. Writing the kept value back, rather than re-rounding the moved one,
matters for optimizers that move weights without a gradient (Adam's L2 weight decay, momentum):
a weight pushed past the midpoint between two levels would otherwise land on the other level. BatchNorm, biases and the classifier
stay in full precision.

The per-tensor state (frozen mask, exponents, partitions applied) lives in module buffers, so
it is saved in checkpoints and ``--resume`` continues the schedule.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from dg_quant.context import RunContext
from dg_quant.errors import ConfigError
from dg_quant.hookimpl import hookimpl
from dg_quant.host import PluginHost
from dg_quant.options import add_options, option, read_options
from dg_quant.ownership import WEIGHT_QUANTIZATION
from dg_quant.quant.api import plan
from dg_quant.quant.config import MAX_BITS, MIN_BITS, LSQConfig, QuantConfig
from dg_quant.quant.inq import (
    APPLIED_BUFFER,
    DEFAULT_PARTITIONS,
    EXPONENTS_BUFFER,
    FROZEN_BUFFER,
    STRATEGIES,
    PartitionSchedule,
    inq_exponents,
    inq_project,
    iter_inq_layers,
    next_frozen_mask,
    parse_partitions,
)

# INQ's power-of-two levels replace the weights: no second quantizer on top.
DGQ_OWNS = (WEIGHT_QUANTIZATION,)
RUN_NAME = "dg_quant.inq.run"  # the per-run ``InqRun``


@dataclass
class INQOptions:
    """Flags of ``dg_quant.inq``."""

    bits: int = option(7, "weight bit width, 2..8 (INQ: 2^(bits-1)+1 power-of-two levels)")
    inq_partitions: str = option(
        ",".join(str(f) for f in DEFAULT_PARTITIONS), "cumulative fractions quantized by each partition"
    )
    inq_strategy: str = option("magnitude", "which free weights a partition freezes", choices=STRATEGIES)
    inq_start_step: int = option(0, "step of the first partition; the others are spread evenly to the end")
    inq_quantize_head: bool = option(False, "quantize the classifier head too")

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}; got {self.bits!r}")
        if self.inq_start_step < 0:
            raise ConfigError(f"inq_start_step must be >= 0; got {self.inq_start_step}")
        self.fractions = parse_partitions(self.inq_partitions)

    def schedule(self, total_steps: int | None) -> PartitionSchedule:
        """The partitions spread over a run of ``total_steps`` (unknown: one step apart)."""
        total = total_steps or self.inq_start_step + len(self.fractions)
        return PartitionSchedule(self.fractions, self.inq_start_step, max(total, self.inq_start_step))


def inq_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The modules this plugin prepared (those holding the INQ buffers)."""
    for layer in iter_inq_layers(model):
        yield layer.name, layer.module


def prepare_inq(model: nn.Module, options: INQOptions) -> list[str]:
    """Register the INQ buffers on every conv/linear weight the policy quantizes; returns their names."""
    decisions = plan(model, QuantConfig(weight=LSQConfig(bits=options.bits), quantize_head=options.inq_quantize_head))
    modules = dict(model.named_modules())
    names = []
    for name, (weights, _acts) in decisions.items():
        module = modules[name]
        if not weights or not isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
            continue
        if hasattr(module, FROZEN_BUFFER):
            continue
        weight = module.weight
        module.register_buffer(FROZEN_BUFFER, torch.zeros_like(weight, dtype=torch.bool))
        module.register_buffer(EXPONENTS_BUFFER, torch.zeros(2, dtype=torch.long, device=weight.device))
        module.register_buffer(APPLIED_BUFFER, torch.zeros((), dtype=torch.long, device=weight.device))
        names.append(name)
    return names


@torch.no_grad()
def apply_partitions(model: nn.Module, optimizer: torch.optim.Optimizer | None, options: INQOptions, due: int) -> int:
    """Bring every INQ tensor up to ``due`` partitions; returns how many tensors changed."""
    changed = 0
    for _, module in inq_modules(model):
        applied = int(getattr(module, APPLIED_BUFFER))
        if applied >= due:
            continue
        weight = module.weight
        if applied == 0:  # n1, n2 are fixed once, from the weights at the first partition
            getattr(module, EXPONENTS_BUFFER).copy_(torch.tensor(inq_exponents(weight, options.bits)))
        frozen = getattr(module, FROZEN_BUFFER)
        frozen.copy_(next_frozen_mask(weight, frozen, options.fractions[due - 1], options.inq_strategy))
        getattr(module, APPLIED_BUFFER).fill_(due)
        _restore_frozen(module)
        if optimizer is not None:
            _mask_optimizer_state(optimizer, weight, frozen)
        changed += 1
    return changed


def _restore_frozen(module: nn.Module) -> None:
    n1, n2 = (int(v) for v in getattr(module, EXPONENTS_BUFFER))
    frozen = getattr(module, FROZEN_BUFFER)
    with torch.no_grad():
        module.weight.copy_(torch.where(frozen, inq_project(module.weight, n1, n2), module.weight))


def _mask_optimizer_state(optimizer: torch.optim.Optimizer, weight: torch.Tensor, frozen: torch.Tensor) -> None:
    """Zero every per-element optimizer state entry (momentum, Adam moments) of frozen weights."""
    for value in optimizer.state.get(weight, {}).values():
        if isinstance(value, torch.Tensor) and value.shape == weight.shape:
            value.masked_fill_(frozen, 0)


def frozen_fraction(model: nn.Module) -> float:
    frozen = total = 0
    for _, module in inq_modules(model):
        mask = getattr(module, FROZEN_BUFFER)
        frozen += int(mask.sum())
        total += mask.numel()
    return frozen / max(total, 1)


@hookimpl
def dgq_add_options(parser: argparse.ArgumentParser) -> None:
    add_options(parser, INQOptions, "INQ (dg_quant.inq)")


@hookimpl
def dgq_configure(config: argparse.Namespace, host: PluginHost, context: RunContext) -> None:
    options = read_options(INQOptions, config)
    schedule = options.schedule(context.total_steps)
    if not context.total_steps:
        warnings.warn(
            f"dg_quant.inq: the run length is unknown, so the partitions are applied at steps "
            f"{schedule.steps()}; give the host the number of steps "
            "(DomainBed: --steps, or register(total_steps=N) from your own script)",
            stacklevel=2,
        )
    host.register(InqRun(options, schedule), name=RUN_NAME)


# Attribute holding a module's frozen weight values during one optimizer step (not saved).
_KEPT_ATTR = "_dgq_inq_kept"


class InqRun:
    """One run's INQ: options parsed once and the partition schedule over the run's length.

    The per-tensor state lives in module buffers (saved with the weights), so this object has
    no ``state_dict`` of its own.
    """

    def __init__(self, options: INQOptions, schedule: PartitionSchedule) -> None:
        self.options, self.schedule = options, schedule

    @hookimpl
    def dgq_configure_model(self, model: nn.Module) -> None:
        if not prepare_inq(model, self.options):
            raise ConfigError("dg_quant.inq found no conv/linear weight to quantize in this model")

    @hookimpl
    def dgq_step_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        due = self.schedule.partitions_due(step)
        if due:
            apply_partitions(model, optimizer, self.options, due)

    @hookimpl
    @torch.no_grad()
    def dgq_after_backward(self, model: nn.Module) -> None:
        for _, module in inq_modules(model):
            frozen = getattr(module, FROZEN_BUFFER)
            grad = module.weight.grad
            if grad is not None:
                grad.masked_fill_(frozen, 0)
            # The last thing before optimizer.step(): keep the frozen values to put back afterwards.
            setattr(module, _KEPT_ATTR, module.weight.detach()[frozen] if frozen.any() else None)

    @hookimpl
    @torch.no_grad()
    def dgq_after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for _, module in inq_modules(model):
            frozen = getattr(module, FROZEN_BUFFER)
            kept = module.__dict__.pop(_KEPT_ATTR, None)
            if not (int(getattr(module, APPLIED_BUFFER)) and frozen.any()):
                continue
            if kept is not None and kept.numel() == int(frozen.sum()):
                module.weight.masked_scatter_(frozen, kept)  # exactly the values before the step
            else:  # no value kept (a step run without dgq_after_backward): back onto the nearest level
                _restore_frozen(module)
            _mask_optimizer_state(optimizer, module.weight, frozen)

    @hookimpl
    def dgq_evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"inq/frozen_fraction": frozen_fraction(model)}

    @hookimpl
    def dgq_train_end(self, model: nn.Module) -> dict[str, float]:
        """A run that ended before the last partition still ends with every weight quantized."""
        options = self.options
        apply_partitions(model, None, options, len(options.fractions))
        return {"inq/frozen_fraction": frozen_fraction(model), "inq/levels": 2 ** (options.bits - 1) + 1}
