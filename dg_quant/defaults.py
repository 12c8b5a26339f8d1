"""The host's own hook implementations, registered before any method plugin (ERM defaults)."""

from __future__ import annotations

import argparse
from typing import Any

from torch import nn

from dg_quant.hookimpl import hookimpl
from dg_quant.options import add_options, read_options
from dg_quant.quant import compression_report, is_quantized
from dg_quant.speed import SpeedOptions, prepare_model


@hookimpl
def dgq_add_options(parser: argparse.ArgumentParser) -> None:
    add_options(parser, SpeedOptions, "speed (every method)")


@hookimpl
def dgq_configure(config: argparse.Namespace) -> None:
    read_options(SpeedOptions, config)


@hookimpl(trylast=True)
def dgq_configure_model(model: nn.Module, config: argparse.Namespace) -> None:
    """Last, so that the quantizers the methods attached get the compiled kernels and NHWC too."""
    prepare_model(model, read_options(SpeedOptions, config))


@hookimpl(trylast=True)
def dgq_compute_gradients(model: nn.Module, batch: tuple, loss_fn: Any) -> dict[str, Any]:
    """ERM: one forward and backward on the whole batch."""
    x, y = batch
    loss = loss_fn(model(x), y)
    loss.backward()
    return {"loss": loss.detach()}


@hookimpl
def dgq_evaluate(model: nn.Module) -> dict[str, Any]:
    """Every evaluation records the size of the model as it would be stored."""
    summary = compression_report(model).summary()
    return {
        "quantized": is_quantized(model),
        "compression_ratio": summary["compression_ratio"],
        "packed_mb": summary["packed_mb"],
        "quantized_param_fraction": summary["quantized_param_fraction"],
    }
