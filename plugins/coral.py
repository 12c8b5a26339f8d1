"""Deep CORAL (Sun & Saenko, 2016) as a loss term: feature means and covariances matched across
the domains of each batch (``dg_quant.methods.coral``).

The penalty is a ``dgq_loss_terms`` contribution, so it composes with any quantization plugin and
with plugins that own the gradient step (SAGM, SAM, FQAT evaluate it at each pass they score).
Its weight defaults to WILDS' per-dataset value (Camelyon17 0.1, Amazon 10, ...; 1.0, DomainBed's
``mmd_gamma``, elsewhere). Domains are the host's: WILDS' grouper groups (``--groupby_fields``),
DomainBed's environments; WILDS trains CORAL with ``--train_loader group`` so that every batch
holds several domains.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from dg_quant.context import RunContext
from dg_quant.errors import ConfigError
from dg_quant.hookimpl import hookimpl
from dg_quant.host import PluginHost
from dg_quant.methods.coral import domain_coral_penalty, penalty_weight_for
from dg_quant.options import add_options, option, read_options


@dataclass
class CORALOptions:
    """CORAL's weight (flag ``--coral_weight``)."""

    coral_weight: float | None = option(
        None,
        "CORAL penalty weight (default: WILDS' value for the dataset, e.g. camelyon17 0.1, amazon 10; "
        "else 1.0 as DomainBed)",
        type=float,
        search=lambda r: float(10 ** r.uniform(-1, 1)),
    )

    def __post_init__(self) -> None:
        if self.coral_weight is not None and self.coral_weight < 0:
            raise ConfigError(f"--coral_weight must be >= 0; got {self.coral_weight}")


class CORALRun:
    """One run's CORAL term with its weight resolved once."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    @hookimpl
    def dgq_loss_terms(
        self, features: torch.Tensor | None, domains: torch.Tensor | None
    ) -> dict[str, torch.Tensor] | None:
        if features is None:
            raise ConfigError(
                "dg_quant.coral needs the classifier's input features, but the model has no `classifier`; "
                "use a dg-quant backbone (featurizer + classifier)"
            )
        if domains is None:
            return None
        return {"coral/penalty": self.weight * domain_coral_penalty(features, domains)}


@hookimpl
def dgq_add_options(parser: argparse.ArgumentParser) -> None:
    add_options(parser, CORALOptions, "CORAL (dg_quant.coral)")


@hookimpl
def dgq_configure(config: argparse.Namespace, host: PluginHost, context: RunContext) -> None:
    weight = read_options(CORALOptions, config).coral_weight
    if weight is None:
        weight = penalty_weight_for(context.dataset or getattr(config, "dataset", None))
    host.register(CORALRun(weight), name="dg_quant.coral.run")
