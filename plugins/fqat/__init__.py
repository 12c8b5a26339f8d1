"""FQAT (Jiang et al., ACM MM 2025): SAGM objective with gradient-disorder freezing of scale factors.

Weights and activations are fake-quantized (LSQ or EWGS backward); every step computes the task
gradient g_QAT and the flatness gradient g_flat apart; every K steps each scale factor's g_QAT
sign-flip rate over the last K steps decides whether its g_QAT is dropped for the next K steps.
This module holds only the hooks; the run's state lives in a ``FQATRun`` registered per run.
See ``docs/fqat.md``.
"""

from __future__ import annotations

import argparse

from dg_quant.context import RunContext
from dg_quant.hookimpl import hookimpl
from dg_quant.host import PluginHost
from dg_quant.options import add_options, read_options
from dg_quant.ownership import GRADIENT_COMPUTATION, WEIGHT_QUANTIZATION
from dg_quant.plugins.fqat.options import FQATOptions
from dg_quant.plugins.fqat.run import FQATRun
from dg_quant.plugins.qat import check_start_in_run, start_step_for

OPTIONS = FQATOptions
# FQAT quantizes and replaces the step (SAGM): the host refuses other plugins owning either.
DGQ_OWNS = (WEIGHT_QUANTIZATION, GRADIENT_COMPUTATION)
# The per-run object's name: it keys FQAT's state in checkpoints (its state_dict).
RUN_NAME = "dg_quant.fqat.run"


@hookimpl
def dgq_add_options(parser: argparse.ArgumentParser) -> None:
    add_options(parser, FQATOptions, "FQAT (dg_quant.fqat)")


@hookimpl
def dgq_configure(config: argparse.Namespace, host: PluginHost, context: RunContext) -> None:
    options = read_options(FQATOptions, config)
    check_start_in_run(options, context)
    host.register(FQATRun(options, context, start_step_for(context, options, 0)), name=RUN_NAME)
