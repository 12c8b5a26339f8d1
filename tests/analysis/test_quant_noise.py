"""Quantization noise per layer and its KL divergence to a uniform distribution (Fig. 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dg_quant.adapters.wilds.checkpoints import load_run_model
from dg_quant.analysis.noise import kl_to_uniform, layer_noise, noise_tables
from dg_quant.quant import iter_quantized_weights
from dg_quant.registry import create_adapter


def test_kl_is_small_for_uniform_and_large_for_gaussian_samples():
    rng = np.random.default_rng(0)
    assert kl_to_uniform(rng.uniform(-1, 1, 200_000)) < 0.002
    assert kl_to_uniform(rng.normal(size=200_000)) > 0.3
    assert kl_to_uniform(np.ones(10)) == 0.0
    # Direct computation on a tiny case: half the mass in one of two bins -> KL 0; all in one -> log 2.
    assert kl_to_uniform(np.array([0.0, 0.0, 0.0, 1.0]), bins=2) == pytest.approx(
        0.75 * np.log(1.5) + 0.25 * np.log(0.5)
    )


def test_noise_of_a_quantized_run_uses_its_own_quantizers(tiny_runs):
    model = load_run_model(tiny_runs["qtdog"]).model
    layers = list(layer_noise(model))
    assert [x.name for x in layers] == [f"{n}.{t}" for n, _m, t, _q in iter_quantized_weights(model)]
    for layer in layers:
        step = layer.step.expand_as(layer.weight)
        inside = (layer.weight / step).abs() < 63
        assert (layer.noise[inside].abs() <= step[inside] / 2 + 1e-7).all()
        codes = layer.quantized / step
        assert torch.allclose(codes, codes.round(), atol=1e-4)  # on the integer grid
    stats, hists = noise_tables(model, bins=50)
    assert list(stats["layer"]) == [x.name for x in layers]
    assert set(hists["kind"]) == {"weight", "noise", "noise_unit", "abs_pos", "abs_neg"}
    assert (hists.groupby(["layer", "kind"]).size() == 50).all()
    big = stats.sort_values("numel").iloc[-1]
    assert big["kl_uniform_unit"] < 0.05  # 7-bit rounding noise is close to U[-s/2, s/2]


def test_full_precision_models_get_a_simulated_quantizer():
    model = create_adapter("digits_cnn", 10)
    stats4, _ = noise_tables(model, bits=4)
    stats8, _ = noise_tables(model, bits=8)
    assert len(stats4) == 4  # the four convolutions; the classifier head stays FP
    assert (stats4["bits"] == 4).all()
    assert (stats4["noise_std"] > stats8["noise_std"]).all()  # fewer bits, more noise


def test_simulated_bits_on_a_quantized_model_use_the_latent_weights(tiny_runs):
    model = load_run_model(tiny_runs["qtdog"]).model
    own = {x.name: x.weight for x in layer_noise(model)}
    simulated = list(layer_noise(model, bits=4))
    assert [x.name for x in simulated] == list(own)
    for layer in simulated:
        assert torch.equal(layer.weight, own[layer.name]) and layer.bits == 4
