"""FQAT (Jiang et al., ACM MM 2025): SAGM objective with gradient-disorder freezing of scale factors.

Weights and activations are fake-quantized (LSQ or EWGS backward); every step computes the task
gradient g_QAT and the flatness gradient g_flat apart; every K steps each scale factor's g_QAT
sign-flip rate over the last K steps decides whether its g_QAT is dropped for the next K steps.
This module holds only the hooks; the run's state lives in a ``FQATRun`` registered per run.
See ``docs/fqat.md``.
"""

from __future__ import annotations

import argparse

from dg_quant.errors import ConfigError
from dg_quant.hookimpl import hookimpl
from dg_quant.host import PluginHost
from dg_quant.options import add_options, read_options
from dg_quant.plugins.fqat.options import FQATOptions
from dg_quant.plugins.fqat.run import FQATRun

OPTIONS = FQATOptions
# Plugins that also quantize the model or replace the step: FQAT already does both.
CONFLICTS = ("dg_quant.sagm", "dg_quant.lsq", "dg_quant.qtdog")
# The per-run object's name: it keys FQAT's state in checkpoints (its state_dict).
RUN_NAME = "dg_quant.fqat.run"


@hookimpl
def dgq_add_options(parser: argparse.ArgumentParser) -> None:
    add_options(parser, FQATOptions, "FQAT (dg_quant.fqat)")


@hookimpl
def dgq_configure(config: argparse.Namespace, host: PluginHost) -> None:
    clash = [name for name in getattr(config, "plugins", []) if name in CONFLICTS]
    if clash:
        raise ConfigError(f"dg_quant.fqat already quantizes and runs SAGM; drop --plugin {' '.join(clash)}")
    host.register(FQATRun(read_options(FQATOptions, config), config), name=RUN_NAME)
