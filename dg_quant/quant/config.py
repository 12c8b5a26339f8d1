"""Dataclass configs for fake quantization, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dg_quant.errors import ConfigError

MIN_BITS, MAX_BITS = 2, 8

Mode = Literal["signed", "symmetric", "unsigned", "auto"]
Granularity = Literal["per_channel", "per_tensor"]
GradScale = Literal["tensor", "per_channel", "none"]
Init = Literal["lsq", "mse"]
FirstLayer = Literal["full", "fp", "activations_only"]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class LSQConfig:
    """One LSQ quantizer (docs/methods.md section 1).

    ``mode``: ``signed`` is [-2^(b-1), 2^(b-1)-1] (lsq-net default), ``symmetric`` drops the most
    negative code, ``unsigned`` is [0, 2^b-1] (post-ReLU inputs), ``auto`` picks signed or
    unsigned from the first data the quantizer sees.
    ``grad_scale``: ``tensor`` is 1/sqrt(Q_P * numel) as in lsq-net and QT-DoG; ``per_channel``
    is the LSQ paper's 1/sqrt(Q_P * elements per step); ``none`` disables scaling.
    """

    bits: int = 7
    mode: Mode = "signed"
    granularity: Granularity = "per_channel"
    grad_scale: GradScale = "tensor"
    init: Init = "lsq"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}; got {self.bits!r}")
        _check_choice("mode", self.mode, ("signed", "symmetric", "unsigned", "auto"))
        _check_choice("granularity", self.granularity, ("per_channel", "per_tensor"))
        _check_choice("grad_scale", self.grad_scale, ("tensor", "per_channel", "none"))
        _check_choice("init", self.init, ("lsq", "mse"))


def default_activation_config(bits: int = 8, init: Init = "lsq") -> LSQConfig:
    """Per-tensor activation quantizer whose sign is chosen from the first batch."""
    return LSQConfig(bits=bits, mode="auto", granularity="per_tensor", init=init)


@dataclass(frozen=True)
class QuantConfig:
    """Which modules get which quantizers.

    Default policy: every conv/linear (and attention input projection) weight is quantized,
    except the classifier head; activations stay FP unless ``activation`` is set.
    ``include``/``exclude`` are fnmatch patterns on ``named_modules()`` names (``exclude`` wins).
    ``first_layer``: ``full`` treats it like any layer, ``fp`` leaves it unquantized,
    ``activations_only`` quantizes only its input (FQAT, lsq-net's default).
    ``head``: module name of the classifier; ``None`` means the last ``nn.Linear``.
    ``enabled``: start with quantization on; QAT schedules start it off and switch it on later.
    """

    weight: LSQConfig | None = field(default_factory=LSQConfig)
    activation: LSQConfig | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    quantize_head: bool = False
    head: str | None = None
    first_layer: FirstLayer = "full"
    enabled: bool = True
    version: int = 1

    def __post_init__(self) -> None:
        _check_choice("first_layer", self.first_layer, ("full", "fp", "activations_only"))
        if self.weight is None and self.activation is None:
            raise ConfigError("QuantConfig quantizes nothing: set weight and/or activation")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
