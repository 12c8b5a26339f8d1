"""Fake quantization: configs, LSQ quantizer, ``quantize_`` and the compression report."""

from dg_quant.quant.api import (
    bake_,
    clamp_steps_,
    is_quantization_enabled,
    is_quantized,
    iter_quantized_weights,
    iter_quantizers,
    latent_weight,
    plan,
    quantizable_modules,
    quantize_,
    set_quantization,
    step_parameters,
)
from dg_quant.quant.config import (
    MAX_BITS,
    MIN_BITS,
    LSQConfig,
    QuantConfig,
    default_activation_config,
)
from dg_quant.quant.lsq import LSQQuantizer, integer_bounds, lsq_fake_quant
from dg_quant.quant.report import CompressionReport, compression_report

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "CompressionReport",
    "LSQConfig",
    "LSQQuantizer",
    "QuantConfig",
    "bake_",
    "clamp_steps_",
    "compression_report",
    "default_activation_config",
    "integer_bounds",
    "is_quantization_enabled",
    "is_quantized",
    "iter_quantized_weights",
    "iter_quantizers",
    "latent_weight",
    "lsq_fake_quant",
    "plan",
    "quantizable_modules",
    "quantize_",
    "set_quantization",
    "step_parameters",
]
