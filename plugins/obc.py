"""OBC/GPTQ post-training quantization at the end of a run (QT-DoG Table 4's PTQ baseline).

``--plugin dg_quant.obc --bits 7`` trains in full precision (the PTQ layers carry quantizers that
stay off, so every checkpoint has one layout), then at ``dgq_train_end`` quantizes the trained
weights layer by layer with OBQ (small layers) or GPTQ (large ones), calibrated on images of the
training split only, i.e. the source domains, never the target. Per-layer reconstruction errors
of the solver and of round-to-nearest go to ``ptq.json`` in the run folder.

The host passes calibration data to ``dgq_train_end`` as ``calibration(num_samples, batch_size)``
(``wilds_run``, ``dgq_ptq`` and the DomainBed launcher do). ``dgq_ptq`` quantizes a saved run
with this plugin and these flags.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from dg_quant.context import Calibration
from dg_quant.errors import ConfigError
from dg_quant.hookimpl import hookimpl
from dg_quant.host import PluginHost
from dg_quant.io import atomic_write_json
from dg_quant.options import add_options, option, read_options
from dg_quant.ownership import WEIGHT_QUANTIZATION
from dg_quant.quant.obc import METHODS, PTQConfig, attach_disabled_quantizers, ptq_, summarize

RESULT_FILE = "ptq.json"
# OBC/GPTQ quantize the trained weights: a QAT plugin's quantizers would be quantized again.
DGQ_OWNS = (WEIGHT_QUANTIZATION,)
RUN_NAME = "dg_quant.obc.run"  # the per-run ``ObcRun``


@dataclass
class OBCOptions:
    """Flags of ``dg_quant.obc`` (also read by ``dgq_ptq``)."""

    bits: int = option(7, "weight bit width, 2..8")
    ptq_method: str = option(
        "obc", "obc: exact OBQ for small layers, GPTQ above; gptq: GPTQ everywhere", choices=METHODS
    )
    ptq_samples: int = option(1024, "calibration images drawn from the training split")
    ptq_batch_size: int = option(64, "calibration batch size")
    ptq_obq_max_cols: int = option(256, "layers with at most this many inputs per output use exact OBQ")
    ptq_damp: float = option(0.01, "Hessian damping, a fraction of its mean diagonal")
    ptq_bn_reestimate: bool = option(False, "re-estimate BatchNorm statistics on the calibration data afterwards")
    ptq_quantize_head: bool = option(False, "quantize the classifier head too")

    def __post_init__(self) -> None:
        if self.ptq_samples <= 0 or self.ptq_batch_size <= 0:
            raise ConfigError("ptq_samples and ptq_batch_size must be positive")
        self.ptq = PTQConfig(
            method=self.ptq_method,
            bits=self.bits,
            obq_max_cols=self.ptq_obq_max_cols,
            damp=self.ptq_damp,
            quantize_head=self.ptq_quantize_head,
            bn_reestimate=self.ptq_bn_reestimate,
        )


def write_results(path: Path, options: OBCOptions, results: list, extra: dict[str, Any] | None = None) -> dict:
    """``ptq.json``: the settings, the totals and one row per layer (solver vs round-to-nearest)."""
    record = {
        "method": options.ptq_method,
        "bits": options.bits,
        "calibration_samples": options.ptq_samples,
        "calibration_split": "train",
        "bn_reestimate": options.ptq_bn_reestimate,
        **summarize(results),
        **(extra or {}),
        "layers": [r.to_dict() for r in results],
    }
    atomic_write_json(path, record)
    return record


@hookimpl
def dgq_add_options(parser: argparse.ArgumentParser) -> None:
    add_options(parser, OBCOptions, "post-training quantization (dg_quant.obc)")


@hookimpl
def dgq_configure(config: argparse.Namespace, host: PluginHost) -> None:
    host.register(ObcRun(read_options(OBCOptions, config)), name=RUN_NAME)


class ObcRun:
    """One run's post-training quantization with its options, parsed once."""

    def __init__(self, options: OBCOptions) -> None:
        self.options = options
        self.results: list = []  # the per-layer results of the last quantization

    @hookimpl
    def dgq_configure_model(self, model: nn.Module) -> None:
        attach_disabled_quantizers(model, self.options.ptq)

    @hookimpl
    def dgq_train_end(self, model: nn.Module, log_dir: str | None, calibration: Calibration | None) -> dict[str, Any]:
        options = self.options
        if calibration is None:
            raise ConfigError(
                "dg_quant.obc needs calibration data from the host; this host gives none, "
                "so quantize the saved run with dgq_ptq instead"
            )
        self.results = ptq_(model, lambda: calibration(options.ptq_samples, options.ptq_batch_size), options.ptq)
        if log_dir is not None:
            write_results(Path(log_dir) / RESULT_FILE, options, self.results)
        return summarize(self.results)
