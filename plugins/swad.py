"""SWAD (Cha et al., NeurIPS 2021): dense weight averaging over the validation loss valley.

Every step's weights join the current segment's average; at each evaluation the segment ends
with the in-domain validation loss of the online model (``id_val/loss``, else ``<split>/loss``
of ``--val_metric``'s split), and SWAD's loss-valley rule (``dg_quant.methods.swad``, ``--swad_n_converge 3
--swad_n_tolerance 6 --swad_tolerance_ratio 0.3``) decides which segments the final average holds.
After the last step the average replaces the trained weights (``dgq_final_model``), its BatchNorm
statistics are recomputed on ``--bn_batches`` training batches (SWAD: 500), and it is the model
of the final record, of model selection and of the exported files.

With a quantization plugin (``--plugin dg_quant.swad --plugin dg_quant.qtdog``), as in the
released QT-DoG code, SWAD restarts when quantization switches on: the valley is searched and the
average taken over quantized-phase weights only; the latent weights and LSQ step sizes are
averaged as parameters and the average is quantized in its forward pass (docs/composing.md).
SWAD does not stop training at a dead valley (SWAD's code does); averaging stops there.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from dg_quant.errors import ConfigError
from dg_quant.hookimpl import hookimpl
from dg_quant.host import PluginHost
from dg_quant.methods.averaging import BNOptions, ParameterAverage, finish_average_, parameters_of
from dg_quant.methods.swad import LossValley, Segment
from dg_quant.options import add_options, option, read_options
from dg_quant.ownership import WEIGHT_AVERAGING
from dg_quant.quant import is_quantization_enabled

DGQ_OWNS = (WEIGHT_AVERAGING,)


@dataclass
class SWADOptions:
    """SWAD's loss-valley settings (SWAD's defaults) and the loss it reads."""

    swad_n_converge: int = option(3, "segments whose first must have the lowest loss for the valley to start")
    swad_n_tolerance: int = option(6, "segments a later segment's loss window spans")
    swad_tolerance_ratio: float = option(0.3, "the valley ends when losses exceed its mean loss x (1 + this)")
    swad_loss: str | None = option(
        None, "record key of the validation loss (default: <split of --val_metric>/loss)", type=str
    )

    def __post_init__(self) -> None:
        LossValley(self.swad_n_converge, self.swad_n_tolerance, self.swad_tolerance_ratio)  # validates


def loss_key(options: SWADOptions, config: Any, record: dict[str, Any]) -> str:
    """``--swad_loss``, else the in-domain validation loss (SWAD's), else that of ``--val_metric``'s split."""
    if options.swad_loss:
        return options.swad_loss
    if "id_val/loss" in record:
        return "id_val/loss"
    val_metric = str(getattr(config, "val_metric", None) or "")
    return val_metric.split("/", 1)[0] + "/loss" if "/" in val_metric else "id_val/loss"


class SWADRun:
    """One run's segment average and loss valley (checkpointed with the run)."""

    def __init__(self, options: SWADOptions, bn: BNOptions, config: Any) -> None:
        self.options, self.bn, self.config = options, bn, config
        self.quantized: bool | None = None
        self.restarts = 0
        self._restart()

    def _restart(self) -> None:
        o = self.options
        self.valley = LossValley(o.swad_n_converge, o.swad_n_tolerance, o.swad_tolerance_ratio)
        self.segment = ParameterAverage()

    @hookimpl(trylast=True)  # the step's final weights: after LSQ's step clamping, INQ's frozen values
    def dgq_after_step(self, model: nn.Module, step: int) -> None:
        quantized = is_quantization_enabled(model)
        if self.quantized is not None and quantized != self.quantized:
            self._restart()  # e.g. QT-DoG's switch: the valley is searched among quantized weights only
            self.restarts += 1
        self.quantized = quantized
        self.segment.add(parameters_of(model), step=step + 1)

    @hookimpl
    def dgq_evaluated(self, record: dict[str, Any]) -> None:
        if self.segment.count == 0:
            return
        key = loss_key(self.options, self.config, record)
        loss = record.get(key)
        if loss is None:
            losses = ", ".join(k for k in record if k.endswith("/loss")) or "none"
            raise ConfigError(
                f"dg_quant.swad reads the validation loss {key!r}, which the evaluation record lacks "
                f"(losses there: {losses}); set --swad_loss"
            )
        self.valley.update(Segment(self.segment.cpu(), float(loss)))
        self.segment = ParameterAverage()

    @hookimpl
    def dgq_final_model(self, model: nn.Module, train_batches: Callable[[int], Iterable[Any]]) -> dict[str, Any] | None:
        average = self.valley.final()
        if average is None:
            return None
        finish_average_(model, average, train_batches(self.bn.bn_batches))
        return {
            "swad/converged": self.valley.is_converged,
            "swad/dead_valley": self.valley.dead_valley,
            "swad/segments": len(self.valley.chosen) if self.valley.is_converged else 1,
            "swad/start_step": average.start_step,
            "swad/end_step": average.end_step,
            "swad/restarts": self.restarts,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "valley": self.valley.state_dict(),
            "segment": self.segment.state_dict(),
            "quantized": self.quantized,
            "restarts": self.restarts,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.valley.load_state_dict(state["valley"])
        self.segment.load_state_dict(state["segment"])
        self.quantized, self.restarts = state["quantized"], int(state["restarts"])


@hookimpl
def dgq_add_options(parser: argparse.ArgumentParser) -> None:
    add_options(parser, SWADOptions, "SWAD (dg_quant.swad)")
    add_options(parser, BNOptions, "weight averaging (dg_quant.swa, dg_quant.swad)")


@hookimpl
def dgq_configure(config: argparse.Namespace, host: PluginHost) -> None:
    options = read_options(SWADOptions, config)
    host.register(SWADRun(options, read_options(BNOptions, config), config), name="dg_quant.swad.run")
