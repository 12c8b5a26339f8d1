"""Plain LSQ quantization-aware training from the first step (the QAT baseline of both papers).

Same options as ``dg_quant.qtdog``; only the switch-on step defaults to 0.
"""

from __future__ import annotations

import argparse

from dg_quant.context import RunContext
from dg_quant.hookimpl import hookimpl
from dg_quant.host import PluginHost
from dg_quant.ownership import WEIGHT_QUANTIZATION
from dg_quant.plugins.qat import add_qat_options, configure_qat

DGQ_OWNS = (WEIGHT_QUANTIZATION,)  # LSQ quantizers on the weights; one quantizer per run
RUN_NAME = "dg_quant.lsq.run"  # the per-run ``QATRun``
DEFAULT_START = 0  # 0: quantized from the first step


@hookimpl
def dgq_add_options(parser: argparse.ArgumentParser) -> None:
    add_qat_options(parser)


@hookimpl
def dgq_configure(config: argparse.Namespace, host: PluginHost, context: RunContext) -> None:
    configure_qat(config, host, context, DEFAULT_START, RUN_NAME)
