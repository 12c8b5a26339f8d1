"""SAGM (Wang et al., CVPR 2023): sharpness-aware gradient matching as a two-pass step.

Works on full-precision models (the FP baseline) and, loaded with ``dg_quant.lsq``, on quantized
ones (the ``LSQ+SAGM`` baseline of FQAT): the step sizes are perturbed and updated like any
parameter. The update direction is ½(g + g'), with g' taken at θ + (ρ/‖g‖ − α)·g and BatchNorm
running statistics left untouched by that second pass (``dg_quant.sharpness``).
"""

from __future__ import annotations

import argparse
from typing import Any

from torch import nn

from dg_quant.hookimpl import hookimpl
from dg_quant.host import PluginHost
from dg_quant.options import add_options, read_options
from dg_quant.ownership import GRADIENT_COMPUTATION
from dg_quant.sharpness import SAGMOptions, apply_sagm_, sagm_gradients

OPTIONS = SAGMOptions
DGQ_OWNS = (GRADIENT_COMPUTATION,)  # the two-pass step replaces the plain backward
RUN_NAME = "dg_quant.sagm.run"  # the per-run ``SAGMRun``


@hookimpl
def dgq_add_options(parser: argparse.ArgumentParser) -> None:
    add_options(parser, SAGMOptions, "SAGM (dg_quant.sagm)")


@hookimpl
def dgq_configure(config: argparse.Namespace, host: PluginHost) -> None:
    host.register(SAGMRun(read_options(SAGMOptions, config)), name=RUN_NAME)


class SAGMRun:
    """One run's SAGM step with its options, parsed once."""

    def __init__(self, options: SAGMOptions) -> None:
        self.options = options

    @hookimpl
    def dgq_compute_gradients(self, model: nn.Module, batch: tuple, loss_fn: Any) -> dict[str, Any]:
        result = sagm_gradients(model, batch, loss_fn, self.options.rho, self.options.alpha)
        apply_sagm_(result)
        return result.metrics()
