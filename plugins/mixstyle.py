"""MixStyle (Zhou et al., ICLR 2021) after the early residual stages of a CNN backbone.

Defaults as the paper and the released QT-DoG code (``resnet50_mixstyle_L234_p0d5_a0d1``): after
stages 1-3 (ResNet ``layer1..3``; for MobileNetV2 the blocks ending at 1/4, 1/8 and 1/16 of the
input), p 0.5, alpha 0.1, random pairing; ``--mixstyle_mix crossdomain`` pairs samples of
different domains (the host's domain labels). Nothing is added to the weights or checkpoints, and
evaluation is unchanged (MixStyle only acts in training mode). ViTs and text encoders are
refused in one line.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn

from dg_quant.errors import ConfigError
from dg_quant.hookimpl import hookimpl
from dg_quant.host import PluginHost
from dg_quant.methods.mixstyle import MIX_MODES, MixStyle, attach_mixstyle
from dg_quant.options import add_options, option, read_options


def _parse_layers(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(part) for part in str(text).replace(" ", "").split(",") if part)
    except ValueError:
        layers = ()
    if not layers or min(layers) < 1:
        raise ConfigError(f"--mixstyle_layers takes stage numbers from 1 separated by commas, e.g. 1,2,3; got {text!r}")
    return layers


@dataclass
class MixStyleOptions:
    """MixStyle's knobs (flags ``--mixstyle_p``, ``--mixstyle_alpha``, ...)."""

    mixstyle_p: float = option(0.5, "probability of mixing at each forward pass")
    mixstyle_alpha: float = option(0.1, "Beta(alpha, alpha) parameter of the mixing weight")
    mixstyle_mix: str = option(
        "random", "pairing: a random permutation, or samples of another domain", choices=MIX_MODES
    )
    mixstyle_layers: str = option("1,2,3", "stages after which MixStyle is inserted (ResNet layer1..)")

    def __post_init__(self) -> None:
        _parse_layers(self.mixstyle_layers)
        MixStyle(self.mixstyle_p, self.mixstyle_alpha, self.mixstyle_mix)  # validates

    @property
    def layers(self) -> tuple[int, ...]:
        return _parse_layers(self.mixstyle_layers)


class MixStyleRun:
    """One run's MixStyle sites: attached to the model, fed each batch's domain labels."""

    def __init__(self, options: MixStyleOptions) -> None:
        self.options = options
        self.sites: list[MixStyle] = []

    @hookimpl(tryfirst=True)  # before quantizers wrap the convolutions (the stage probe runs FP)
    def dgq_configure_model(self, model: nn.Module) -> None:
        o = self.options
        self.sites = attach_mixstyle(model, o.layers, lambda: MixStyle(o.mixstyle_p, o.mixstyle_alpha, o.mixstyle_mix))

    @hookimpl
    def dgq_step_start(self, domains: torch.Tensor | None) -> None:
        for site in self.sites:
            site.domains = domains


@hookimpl
def dgq_add_options(parser: argparse.ArgumentParser) -> None:
    add_options(parser, MixStyleOptions, "MixStyle (dg_quant.mixstyle)")


@hookimpl
def dgq_configure(config: argparse.Namespace, host: PluginHost) -> None:
    host.register(MixStyleRun(read_options(MixStyleOptions, config)), name="dg_quant.mixstyle.run")
