"""LSQ quantization-aware training, the method behind ``dg_quant.qtdog``, ``dg_quant.lsq`` (and FQAT's quantizers).

``QATOptions`` declares the flags (``--bits``, ``--quant_start_step``, ...); ``configure_qat``
parses them once per run, validates them against the run's length and registers a ``QATRun``,
which attaches the quantizers (``dgq_configure_model``), switches them on at the start step and
keeps the step sizes positive. ``dg_quant.qtdog`` and ``dg_quant.lsq`` are this module with
different default start steps. Not a plugin itself: it has no module-level hooks.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from torch import nn

from dg_quant.context import RunContext
from dg_quant.errors import ConfigError
from dg_quant.hookimpl import hookimpl
from dg_quant.host import PluginHost
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
from dg_quant.schedule import paper_start_step


def _valid_bits(bits: object) -> bool:
    return isinstance(bits, int) and not isinstance(bits, bool) and MIN_BITS <= bits <= MAX_BITS


@dataclass
class QATOptions:
    """Quantization options shared by the QAT plugins (flags ``--bits``, ``--quant_start_step``, ...)."""

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
        "depthwise nets, see docs/step_init.md), or lsq under --qtdog_compat as the released code",
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
            raise ConfigError(f"--act_bits must be 0 (off) or from {MIN_BITS} to {MAX_BITS}; got {self.act_bits!r}")
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


def check_start_in_run(options: QATOptions, context: RunContext) -> None:
    """ConfigError if ``--quant_start_step`` is at or past the run's last step (nothing would be quantized)."""
    total = context.total_steps
    start = options.quant_start_step
    if start is not None and isinstance(total, int) and total > 0 and start >= total:
        raise ConfigError(
            f"--quant_start_step {start} is not before the end of the run ({total} steps), so nothing would be "
            "quantized; lower it or train longer"
        )


def start_step_for(context: RunContext, options: QATOptions, default: int | None) -> int:
    """The run's switch-on step (``resolve_start_step`` with the run's length and dataset)."""
    return resolve_start_step(options, default, context.total_steps, context.dataset)


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


class QATRun:
    """One run's LSQ QAT: the options parsed once and the switch-on step, with the step hooks."""

    def __init__(self, options: QATOptions, start_step: int) -> None:
        self.options, self.start_step = options, start_step

    @hookimpl
    def dgq_configure_model(self, model: nn.Module) -> None:
        prepare(model, self.options, self.start_step)

    @hookimpl
    def dgq_step_start(self, model: nn.Module, step: int) -> None:
        if step < self.start_step:
            return
        if not is_quantization_enabled(model):
            switch_on(model, self.options.qtdog_compat)
        elif self.options.qtdog_compat:
            freeze_quantized(model)  # a resumed run restores the quantizers but not requires_grad

    @hookimpl
    def dgq_after_step(self, model: nn.Module) -> None:
        clamp_steps_(model)


def add_qat_options(parser: argparse.ArgumentParser) -> None:
    """The QAT flags (shared by ``dg_quant.qtdog`` and ``dg_quant.lsq``; added once)."""
    add_options(parser, QATOptions, "quantization (dg_quant.qtdog, dg_quant.lsq)")


def configure_qat(
    config: argparse.Namespace, host: PluginHost, context: RunContext, default_start: int | None, name: str
) -> QATRun:
    """Parse and check the QAT options once, and register the run's ``QATRun`` under ``name``.

    ``default_start``: the switch-on step when ``--quant_start_step`` is not given (None:
    QT-DoG's paper schedule for the dataset, scaled to the run's length).
    """
    options = read_options(QATOptions, config)
    check_start_in_run(options, context)
    run = QATRun(options, start_step_for(context, options, default_start))
    host.register(run, name=name)
    return run
