"""SWA (Izmailov et al., UAI 2018): the uniform average of the weights over the end of training.

From ``--swa_start`` (a fraction of the run; 0.75 by default) every ``--swa_every`` steps the
parameters join a running mean; after the last step the average replaces the trained weights
(``dgq_final_model``), its BatchNorm statistics are recomputed on training batches, and it is
what the final record, model selection and the exported files use. On a quantized run the
average restarts when quantization switches on, so only quantized weights are averaged (the rule
of the released QT-DoG code for SWAD, docs/composing.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from dg_quant.context import RunContext
from dg_quant.errors import ConfigError
from dg_quant.hookimpl import hookimpl
from dg_quant.host import PluginHost
from dg_quant.methods.averaging import BNOptions, ParameterAverage, finish_average_, parameters_of
from dg_quant.options import add_options, option, read_options
from dg_quant.ownership import WEIGHT_AVERAGING
from dg_quant.quant import is_quantization_enabled

DGQ_OWNS = (WEIGHT_AVERAGING,)


@dataclass
class SWAOptions:
    """When SWA averages (flags ``--swa_start``, ``--swa_every``)."""

    swa_start: float = option(0.75, "fraction of the run after which the weights are averaged")
    swa_every: int = option(1, "steps between two snapshots of the average")

    def __post_init__(self) -> None:
        if not 0 <= self.swa_start < 1:
            raise ConfigError(f"--swa_start must be in [0, 1); got {self.swa_start}")
        if self.swa_every < 1:
            raise ConfigError(f"--swa_every must be >= 1; got {self.swa_every}")


class SWARun:
    """One run's running average (checkpointed with the run)."""

    def __init__(self, options: SWAOptions, bn: BNOptions, total_steps: int) -> None:
        self.options, self.bn = options, bn
        self.start = int(options.swa_start * total_steps)
        self.average = ParameterAverage()
        self.quantized: bool | None = None

    @hookimpl(trylast=True)  # the step's final weights: after LSQ's step clamping, INQ's frozen values
    def dgq_after_step(self, model: nn.Module, step: int) -> None:
        done = step + 1
        if done <= self.start or (done - self.start) % self.options.swa_every:
            return
        quantized = is_quantization_enabled(model)
        if self.quantized is not None and quantized != self.quantized:
            self.average = ParameterAverage()  # average one phase only (quantized after the switch)
        self.quantized = quantized
        self.average.add(parameters_of(model), step=done)

    @hookimpl
    def dgq_final_model(self, model: nn.Module, train_batches: Callable[[int], Iterable[Any]]) -> dict[str, Any] | None:
        if self.average.count == 0:
            return None
        finish_average_(model, self.average, train_batches(self.bn.bn_batches))
        return {
            "swa/snapshots": self.average.count,
            "swa/start_step": self.average.start_step,
            "swa/end_step": self.average.end_step,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average.state_dict(), "quantized": self.quantized}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average.load_state_dict(state["average"])
        self.quantized = state["quantized"]


@hookimpl
def dgq_add_options(parser: argparse.ArgumentParser) -> None:
    add_options(parser, SWAOptions, "SWA (dg_quant.swa)")
    add_options(parser, BNOptions, "weight averaging (dg_quant.swa, dg_quant.swad)")


@hookimpl
def dgq_configure(config: argparse.Namespace, host: PluginHost, context: RunContext) -> None:
    options, bn = read_options(SWAOptions, config), read_options(BNOptions, config)
    total = context.total_steps or 0
    if total < 1:
        raise ConfigError("dg_quant.swa needs the run's length (context.total_steps); the host did not give it")
    host.register(SWARun(options, bn, total), name="dg_quant.swa.run")
