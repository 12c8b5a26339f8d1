"""Training-speed settings every host shares: bf16 autocast, channels_last, torch.compile.

These are the settings under which the step-time ratios of ``benchmarks/README.md`` are measured
on GPU (``benchmarks/bench.py``); declaring them once here gives ``wilds_run`` the flags and DomainBed
the hparams of the same name, and ``Trainer`` applies them for every method alike. fp16 is not
offered: it needs loss scaling, which would rescale the gradients SAGM and FQAT perturb with.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from dg_quant.errors import ConfigError
from dg_quant.options import option
from dg_quant.quant.api import iter_quantizers, set_compiled_kernels
from dg_quant.quant.lsq import lsq_fake_quant

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
QUANT_KERNELS = ("auto", "eager", "compiled")
KERNELS_ENV = "DG_QUANT_QUANT_KERNELS"  # what ``auto`` means here: eager or compiled (the tests pin eager)


@dataclass
class SpeedOptions:
    """How fast the training step runs; none of these changes what the method computes."""

    precision: str = option(
        "fp32",
        "forward-pass precision: fp32, or bf16 autocast (weights, steps and optimizer stay fp32)",
        choices=tuple(PRECISIONS),
    )
    channels_last: bool = option(False, "store 4-D weights NHWC (faster convolutions on GPUs with tensor cores)")
    compile: bool = option(False, "torch.compile the model in place (the first steps are slow while it compiles)")
    quant_kernels: str = option(
        "eager",
        "LSQ fake-quant kernels: eager, fused torch.compile kernels (compiled), or auto: compiled where a "
        f"compiler is available (C++ on CPU, triton on CUDA; built when the run starts), else eager; ${KERNELS_ENV} "
        "overrides auto",
        choices=QUANT_KERNELS,
    )

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
        if self.quant_kernels not in QUANT_KERNELS:
            raise ConfigError(f"--quant_kernels {self.quant_kernels}: choose auto, eager or compiled")

    @property
    def needs_compiler(self) -> bool:
        return self.compile or self.quant_kernels == "compiled"


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def check_compiler(device: torch.device) -> None:
    """torch.compile on CPU builds C++: fail now, in one line, rather than at the first step."""
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        raise ConfigError(
            "--compile / --quant_kernels compiled need a C++ compiler on CPU (none on PATH); install "
            "g++ or drop the option"
        )


def compiler_available(device: torch.device) -> bool:
    """Whether torch.compile can build kernels for ``device``: a C++ compiler on CPU, triton on CUDA."""
    if device.type == "cpu":
        return any(shutil.which(cc) for cc in ("c++", "g++", "clang++"))
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


@functools.cache
def _compiled_kernels_work(device: torch.device) -> bool:
    """Build the fused LSQ kernels once on a tiny tensor (the compile every later call reuses); False
    with a warning if that fails (then the eager kernels run: same numbers, slower)."""
    try:
        for rows in (1, 4):  # per tensor and per channel
            x = torch.randn(rows, 8, device=device, requires_grad=True)
            s = torch.full((rows, 1), 0.1, device=device, requires_grad=True)
            lsq_fake_quant(x, s, 8, 7, 1.0, 0.0, True).sum().backward()
        return True
    except Exception as exc:  # noqa: BLE001 - any compiler failure means: use the eager kernels
        warnings.warn(f"--quant_kernels auto: compiled LSQ kernels failed ({exc!s:.120}); using eager", stacklevel=2)
        return False


def resolve_quant_kernels(choice: str, device: torch.device) -> str:
    """``eager`` or ``compiled`` for ``choice``; ``auto`` is $DG_QUANT_QUANT_KERNELS if set, else compiled where
    the kernels build on ``device`` (they are compiled here, once per process), else eager."""
    if choice != "auto":
        return choice
    pinned = os.environ.get(KERNELS_ENV, "")
    if pinned:
        if pinned not in ("eager", "compiled"):
            raise ConfigError(f"{KERNELS_ENV}={pinned}: set it to eager or compiled, or unset it")
        return pinned
    return "compiled" if compiler_available(device) and _compiled_kernels_work(device) else "eager"


def prepare_model(model: nn.Module, options: SpeedOptions) -> nn.Module:
    """Apply the memory-format and compile settings to ``model`` in place (state_dict keys unchanged)."""
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    if options.needs_compiler:
        check_compiler(model_device(model))
    # A whole-model compile fuses the quantizers itself; auto then keeps the eager kernels.
    if any(True for _ in iter_quantizers(model)) and not (options.compile and options.quant_kernels == "auto"):
        if resolve_quant_kernels(options.quant_kernels, model_device(model)) == "compiled":
            set_compiled_kernels(model)  # every quantizer the methods attached
    if options.compile:
        model.compile()  # in place: checkpoints keep their keys, hooks still see the same module
    return model


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if device.type == "cuda" and not _cuda_bf16(device.index):
        raise ConfigError(f"--precision {precision}: this GPU has no bf16 support; use --precision fp32")
    return torch.autocast(device_type=device.type, dtype=dtype)


@functools.cache
def _cuda_bf16(index: int | None) -> bool:
    """Asked once per GPU: ``autocast`` runs every step, the answer never changes."""
    with torch.cuda.device(index):
        return torch.cuda.is_bf16_supported()
