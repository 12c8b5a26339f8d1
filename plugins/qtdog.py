"""QT-DoG (Javed et al., ICML 2025): ERM, then LSQ weight quantization from a given step.

Defaults follow the paper: 7-bit signed weights, per-channel steps, switched on at step 2000
(40% of a shorter run), classifier and activations in full precision. Unlike the released code,
the step sizes and the quantized weights keep training after the switch; ``--qtdog_compat true``
reproduces the released behaviour (docs/methods.md 11.3).
"""

from __future__ import annotations

import argparse

from dg_quant.context import RunContext
from dg_quant.hookimpl import hookimpl
from dg_quant.host import PluginHost
from dg_quant.ownership import WEIGHT_QUANTIZATION
from dg_quant.plugins.qat import add_qat_options, configure_qat

DGQ_OWNS = (WEIGHT_QUANTIZATION,)  # LSQ quantizers on the weights; one quantizer per run
RUN_NAME = "dg_quant.qtdog.run"  # the per-run ``QATRun``
DEFAULT_START = None  # QT-DoG's paper schedule (2000 of 5000 steps, 8000 of 15000 on DomainNet, scaled to the run)


@hookimpl
def dgq_add_options(parser: argparse.ArgumentParser) -> None:
    add_qat_options(parser)


@hookimpl
def dgq_configure(config: argparse.Namespace, host: PluginHost, context: RunContext) -> None:
    configure_qat(config, host, context, DEFAULT_START, RUN_NAME)
