"""SAM (Foret et al., ICLR 2021): the step's gradient taken at the worst point of a rho-ball.

Owns the gradient computation, so it runs with quantization plugins (``--plugin dg_quant.sam
--plugin dg_quant.qtdog``: the latent weights and step sizes are perturbed like any parameter)
and with loss terms (CORAL), but not with SAGM or FQAT, which own the step too.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from torch import nn

from dg_quant.errors import ConfigError
from dg_quant.hookimpl import hookimpl
from dg_quant.methods.sam import sam_gradients_
from dg_quant.options import add_options, option, read_options
from dg_quant.ownership import GRADIENT_COMPUTATION

DGQ_OWNS = (GRADIENT_COMPUTATION,)  # the two-pass step replaces the plain backward


@dataclass
class SAMOptions:
    """SAM's radius (flag ``--rho``, shared with SAGM, which cannot run beside it)."""

    rho: float = option(0.05, "SAM perturbation radius rho", search=lambda r: float(r.choice([0.01, 0.02, 0.05, 0.1])))

    def __post_init__(self) -> None:
        if not self.rho > 0:
            raise ConfigError(f"--rho must be > 0; got {self.rho}")


@hookimpl
def dgq_add_options(parser: argparse.ArgumentParser) -> None:
    add_options(parser, SAMOptions, "SAM (dg_quant.sam)")


@hookimpl
def dgq_configure(config: argparse.Namespace) -> None:
    read_options(SAMOptions, config)


@hookimpl
def dgq_compute_gradients(model: nn.Module, batch: tuple, loss_fn: Any, config: argparse.Namespace) -> dict[str, Any]:
    return sam_gradients_(model, batch, loss_fn, read_options(SAMOptions, config).rho)
