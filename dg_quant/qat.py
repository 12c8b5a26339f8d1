"""Shared pieces of the QAT plugins (QT-DoG, plain LSQ, FQAT): options, schedule, switch-on."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn

from dg_quant.errors import ConfigError
from dg_quant.hookimpl import hookimpl
from dg_quant.options import add_options, option, read_options
from dg_quant.quant import (
    MAX_BITS,
    MIN_BITS,
    LSQConfig,
    QuantConfig,
    clamp_steps_,
    default_activation_config,
    is_quantization_enabled,
    iter_quantized_weights,
    latent_weight,
    quantize_,
    set_quantization,
    step_parameters,
)

PAPER_START_STEP = 2000
PAPER_TOTAL_STEPS = 5000
# QT-DoG's switch-on step and run length per dataset (appendix: 8,000 of 15,000 steps on
# DomainNet, 2,000 of 5,000 on the others). Keys are dataset names in lower case without
# separators, so WILDS' "domainnet" and DomainBed's "DomainNet" both match.
PAPER_SCHEDULES: dict[str, tuple[int, int]] = {"domainnet": (8000, 15000)}


def _dataset_key(dataset: str | None) -> str:
    return "".join(c for c in str(dataset or "").lower() if c.isalnum())


def paper_start_step(dataset: str | None, total_steps: int | None) -> int:
    """QT-DoG's switch-on step for ``dataset``, scaled down for a run shorter than the paper's."""
    start, total = PAPER_SCHEDULES.get(_dataset_key(dataset), (PAPER_START_STEP, PAPER_TOTAL_STEPS))
    if total_steps is not None and total_steps < total:
        return round(total_steps * start / total)
    return start


def _valid_bits(bits: object) -> bool:
    return isinstance(bits, int) and not isinstance(bits, bool) and MIN_BITS <= bits <= MAX_BITS


@dataclass
class QATOptions:
    """Quantization options shared by the QAT plugins (flags ``--bits``, ``--quant-start-step``, ...)."""

    bits: int = option(7, "weight bit width, 2..8", search=lambda r: int(r.choice([5, 6, 7, 8])))
    quant_start_step: int | None = option(
        None,
        "step at which quantization switches on (QT-DoG: 2000 of 5000 steps, 8000 of 15000 on DomainNet, "
        "scaled down for shorter runs; LSQ: 0)",
        type=int,
    )
    granularity: str = option("per_channel", "weight step granularity", choices=("per_channel", "per_tensor"))
    grad_scale: str = option(
        "tensor",
        "step-gradient scale: lsq-net's whole tensor, the LSQ paper's per channel, or none",
        choices=("tensor", "per_channel", "none"),
    )
    weight_init: str = option(
        "auto",
        "step initialisation for weights at the switch; auto is mse (the LSQ rule wrecks pretrained "
        "depthwise nets, see docs/step_init.md), or lsq under --qtdog-compat as the released code",
        choices=("auto", "lsq", "mse"),
    )
    act_bits: int = option(0, "input-activation bit width; 0 keeps activations in full precision")
    act_init: str = option("lsq", "step initialisation for activations (first batch)", choices=("lsq", "mse"))
    first_layer: str = option("full", "first layer policy", choices=("full", "fp", "activations_only"))
    quantize_head: bool = option(False, "quantize the classifier head too")
    qtdog_compat: bool = option(
        False,
        "reproduce the released QT-DoG code: only Conv2d quantized, and after the switch the quantized "
        "weights and step sizes stop training (they drop out of its optimizer)",
    )

    def __post_init__(self) -> None:
        if not _valid_bits(self.bits):
            raise ConfigError(f"--bits must be an integer from {MIN_BITS} to {MAX_BITS}; got {self.bits!r}")
        if self.act_bits != 0 and not _valid_bits(self.act_bits):
            raise ConfigError(f"--act-bits must be 0 (off) or from {MIN_BITS} to {MAX_BITS}; got {self.act_bits!r}")
        self.quant_config(enabled=True)  # validates the remaining choices
        if self.quant_start_step is not None and self.quant_start_step < 0:
            raise ConfigError(f"quant_start_step must be >= 0; got {self.quant_start_step}")

    @property
    def resolved_weight_init(self) -> str:
        """``weight_init``, or its default: ``mse``, except ``lsq`` when reproducing the released code."""
        if self.weight_init != "auto":
            return self.weight_init
        return "lsq" if self.qtdog_compat else "mse"

    def quant_config(self, enabled: bool) -> QuantConfig:
        weight = LSQConfig(
            bits=self.bits,
            mode="signed",
            granularity=self.granularity,
            grad_scale=self.grad_scale,
            init=self.resolved_weight_init,
        )
        if self.act_bits:
            activation = default_activation_config(self.act_bits, self.act_init)
        else:
            activation = None
        return QuantConfig(
            weight=weight,
            activation=activation,
            first_layer=self.first_layer,
            quantize_head=self.quantize_head,
            enabled=enabled,
        )


def resolve_start_step(
    options: QATOptions, default: int | None, total_steps: int | None, dataset: str | None = None
) -> int:
    """The switch-on step: the option if set, else ``default``, else QT-DoG's step for the
    dataset (``paper_start_step``: 8000 on DomainNet, 2000 elsewhere, scaled to short runs)."""
    if options.quant_start_step is not None:
        return options.quant_start_step
    if default is not None:
        return default
    return paper_start_step(dataset, total_steps)


def check_start_in_run(options: QATOptions, config: argparse.Namespace) -> None:
    """ConfigError if ``--quant-start-step`` is at or past the run's last step (nothing would be quantized)."""
    total = getattr(config, "total_steps", None)
    start = options.quant_start_step
    if start is not None and isinstance(total, int) and total > 0 and start >= total:
        raise ConfigError(
            f"--quant-start-step {start} is not before the end of the run ({total} steps), so nothing would be "
            "quantized; lower it or train longer"
        )


def start_step_for(config: argparse.Namespace, options: QATOptions, default: int | None) -> int:
    return resolve_start_step(options, default, getattr(config, "total_steps", None), getattr(config, "dataset", None))


def prepare(model: nn.Module, options: QATOptions, start_step: int) -> None:
    """Attach quantizers (off until ``start_step``, unless it is 0)."""
    filter_fn = (lambda m, _name: isinstance(m, nn.Conv2d)) if options.qtdog_compat else None
    quantize_(model, options.quant_config(enabled=start_step == 0), filter_fn=filter_fn)


def switch_on(model: nn.Module, compat: bool) -> None:
    """Turn quantization on; under ``compat`` freeze what the released code stops training."""
    set_quantization(model, True)
    if compat:
        freeze_quantized(model)


def freeze_quantized(model: nn.Module) -> None:
    """Stop training the step sizes and the quantized weights (the released QT-DoG behaviour).

    They stay in the optimizer's groups, so its ``state_dict`` keeps the shape of a fresh one and
    a run resumes; with ``requires_grad`` off they get no gradient and the optimizer skips them.
    """
    frozen = step_parameters(model) + [latent_weight(m, t) for _, m, t, _q in iter_quantized_weights(model)]
    for p in frozen:
        p.requires_grad_(False)
        p.grad = None


class QATHooks:
    """Hook implementations of a QAT plugin whose quantization starts at ``default_start``.

    ``dg_quant.qtdog`` (start at QT-DoG's scaled 2000) and ``dg_quant.lsq`` (start at 0) are
    this class with different defaults; their modules re-export the bound hooks.
    """

    def __init__(self, default_start: int | None) -> None:
        self.default_start = default_start

    @hookimpl
    def dgq_add_options(self, parser: argparse.ArgumentParser) -> None:
        add_options(parser, QATOptions, "quantization (dg_quant.qtdog, dg_quant.lsq)")

    @hookimpl
    def dgq_configure(self, config: argparse.Namespace) -> None:
        check_start_in_run(read_options(QATOptions, config), config)

    @hookimpl
    def dgq_configure_model(self, model: nn.Module, config: argparse.Namespace) -> None:
        options = read_options(QATOptions, config)
        prepare(model, options, start_step_for(config, options, self.default_start))

    @hookimpl
    def dgq_step_start(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, config: argparse.Namespace
    ) -> None:
        options = read_options(QATOptions, config)
        if step < start_step_for(config, options, self.default_start):
            return
        if not is_quantization_enabled(model):
            switch_on(model, options.qtdog_compat)
        elif options.qtdog_compat:
            freeze_quantized(model)  # a resumed run restores the quantizers but not requires_grad

    @hookimpl
    def dgq_after_step(self, model: nn.Module) -> None:
        clamp_steps_(model)
