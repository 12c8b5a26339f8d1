"""Quantization noise per layer: weights, error ``Q(w) - w`` and its KL divergence to uniform.

QT-DoG Fig. 2 / App. L: with a small step relative to the weight range, rounding error is close
to ``U[-s/2, s/2]``; the paper reports KL(noise || uniform with the same min and max) = 0.0009 for
a 7-bit ResNet-50 layer. For a quantized model the layers' own quantizers are used; for a
full-precision model (or with ``bits``) every weight the QT-DoG policy would quantize gets a
fresh per-channel LSQ quantizer initialised from the weights, i.e. what switching on would do.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.utils import parametrize

from dg_quant.quant import (
    LSQConfig,
    LSQQuantizer,
    QuantConfig,
    iter_quantized_weights,
    latent_weight,
    plan,
)
from dg_quant.quant.api import weight_names


@dataclass
class LayerNoise:
    """One weight tensor, its quantized value and the step sizes that produced it."""

    name: str
    weight: torch.Tensor
    quantized: torch.Tensor
    step: torch.Tensor
    bits: int

    @property
    def noise(self) -> torch.Tensor:
        return self.quantized - self.weight


@torch.no_grad()
def _quantize_with(quantizer: LSQQuantizer, weight: torch.Tensor) -> torch.Tensor:
    return quantizer.integers(weight) * quantizer.step


@torch.no_grad()
def layer_noise(model: nn.Module, bits: int | None = None, granularity: str = "per_channel") -> Iterator[LayerNoise]:
    """Every quantized weight of ``model`` (own quantizers), or with ``bits`` a simulated one
    (on the latent weights of a quantized model)."""
    own = list(iter_quantized_weights(model))
    if own and bits is None:
        for name, module, tensor_name, q in own:
            w = latent_weight(module, tensor_name).detach().float().cpu()
            if not q.enabled:  # still in the FP phase: the step the switch-on would set
                q = _fresh_quantizer(q.config, w)
            yield LayerNoise(
                f"{name}.{tensor_name}", w, _quantize_with(q, w.to(q.step.device)).cpu(), q.step.detach().cpu(), q.bits
            )
        return
    config = LSQConfig(bits=bits or 7, mode="signed", granularity=granularity)
    modules = dict(model.named_modules())
    for name, (weights, _acts) in plan(model, QuantConfig(weight=config)).items():
        if not weights:
            continue
        for tensor_name in weight_names(modules[name]):
            module = modules[name]
            quantized = parametrize.is_parametrized(module, tensor_name)
            w = (
                (latent_weight(module, tensor_name) if quantized else getattr(module, tensor_name))
                .detach()
                .float()
                .cpu()
            )
            q = _fresh_quantizer(config, w)
            yield LayerNoise(f"{name}.{tensor_name}", w, _quantize_with(q, w), q.step.detach().cpu(), config.bits)


def _fresh_quantizer(config: LSQConfig, weight: torch.Tensor) -> LSQQuantizer:
    shape = (weight.shape[0],) + (1,) * (weight.dim() - 1) if config.granularity == "per_channel" else (1,)
    q = LSQQuantizer(config, shape, is_weight=True)
    q.initialize(weight)
    return q


def kl_to_uniform(values: torch.Tensor | np.ndarray, bins: int = 100) -> float:
    """KL(histogram of ``values`` || uniform on [min, max]) over ``bins`` equal bins, in nats."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return 0.0
    counts, _ = np.histogram(arr, bins=bins, range=(lo, hi))
    p = counts / counts.sum()
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] * bins)))


def _skewness(x: np.ndarray) -> float:
    std = x.std()
    return float(((x - x.mean()) ** 3).mean() / std**3) if std > 0 else 0.0


def noise_tables(
    model: nn.Module, bits: int | None = None, bins: int = 100, granularity: str = "per_channel"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-layer statistics, histograms) of weights and quantization noise.

    Statistics: sizes, mean step, weight mean/std/skewness (symmetry, App. L), noise range and
    std against the uniform's ``(max - min) / sqrt(12)``, the clipped fraction, ``kl_uniform``
    (the paper's: raw noise against the uniform on its own min and max) and ``kl_uniform_unit``
    (noise of the unclipped weights divided by their own step, against U[-1/2, 1/2]: per-channel
    steps make the raw noise a mixture of uniforms of different widths, and a few clipped
    weights stretch its range). Histograms: ``bins`` bins per layer and kind (``weight``,
    ``noise``, ``noise_unit``, and ``abs_pos``/``abs_neg`` for the symmetry panel: |w| of
    positive and of negative weights).
    """
    stats, hists = [], []
    for layer in layer_noise(model, bits, granularity):
        w, e = layer.weight.numpy().ravel(), layer.noise.numpy().ravel()
        step = layer.step.numpy().ravel()
        half = np.broadcast_to(layer.step.numpy(), layer.weight.shape).ravel() / 2
        inside = np.abs(e) <= half * (1 + 1e-6)
        unit = e[inside] / (2 * half[inside])  # in [-1/2, 1/2] whatever the channel's step
        stats.append(
            {
                "layer": layer.name,
                "numel": w.size,
                "bits": layer.bits,
                "step_mean": float(step.mean()),
                "weight_mean": float(w.mean()),
                "weight_std": float(w.std()),
                "weight_skew": _skewness(w),
                "noise_min": float(e.min()),
                "noise_max": float(e.max()),
                "noise_std": float(e.std()),
                "uniform_std": float((e.max() - e.min()) / np.sqrt(12)),
                "clipped_fraction": float(1 - inside.mean()),
                "kl_uniform": kl_to_uniform(e, bins),
                "kl_uniform_unit": kl_to_uniform(unit, bins) if unit.size else None,
            }
        )
        top = float(np.abs(w).max()) or 1.0
        for kind, values, span in (
            ("weight", w, None),
            ("noise", e, None),
            ("noise_unit", unit, (-0.5, 0.5)),
            ("abs_pos", w[w > 0], (0.0, top)),
            ("abs_neg", -w[w < 0], (0.0, top)),
        ):
            if values.size == 0:
                continue
            counts, edges = np.histogram(values, bins=bins, range=span)
            width = edges[1] - edges[0]
            density = counts / max(counts.sum() * width, 1e-30)
            hists += [
                {
                    "layer": layer.name,
                    "kind": kind,
                    "bin_left": float(a),
                    "bin_right": float(b),
                    "count": int(c),
                    "density": float(d),
                }
                for a, b, c, d in zip(edges[:-1], edges[1:], counts, density)
            ]
    return pd.DataFrame(stats), pd.DataFrame(hists)
