"""The torchao route: LSQ-quantized linear layers as torchao Int8Tensors built from the learned steps."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from dg_quant.errors import ConfigError
from dg_quant.quant.api import iter_quantized_weights, quantize_
from dg_quant.quant.config import LSQConfig, QuantConfig, default_activation_config

ao = pytest.importorskip("torchao.quantization")
from dg_quant.deploy.torchao import to_torchao, torchao_layers  # noqa: E402


def _vit(act_bits: int | None) -> nn.Module:
    from dg_quant.registry import create_adapter

    torch.manual_seed(0)
    model = create_adapter("test_deit", num_classes=5)
    act = default_activation_config(act_bits) if act_bits else None
    quantize_(model, QuantConfig(weight=LSQConfig(bits=6), activation=act))
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    return model


@pytest.mark.parametrize("act_bits", [None, 8])
def test_int8_tensors_hold_the_learned_codes_and_reproduce_the_model(act_bits):
    model = _vit(act_bits)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    converted, names = to_torchao(model, "learned")
    linears = {n for n, m, _t, _q in iter_quantized_weights(model) if isinstance(m, nn.Linear)}
    assert set(names) == linears | {"featurizer.patch_embed.proj"} and linears  # the patch conv as intx codes
    for name, module, _t, q in iter_quantized_weights(model):
        if name in linears:
            weight = converted.get_submodule(name).weight
            assert isinstance(weight, ao.Int8Tensor) and weight.qdata.dtype == torch.int8
            torch.testing.assert_close(
                weight.qdata.to(torch.float32), q.integers(module.parametrizations.weight.original), rtol=0, atol=0
            )
    with torch.no_grad():
        got = converted(x)
        assert torch.equal(model(x), want)  # the trained model is untouched
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_dynamic_activations_use_torchao_integer_matmul():
    model = _vit(8)
    converted, _names = to_torchao(model)  # a W/A model defaults to dynamic int8 activations
    x = torch.randn(3, 3, 32, 32)
    with torch.profiler.profile() as prof, torch.no_grad():
        got = converted(x)
    assert "aten::_int_mm" in {e.name for e in prof.events()}
    with torch.no_grad():
        want = model(x)
    assert (got - want).abs().max() < 0.1 * want.abs().max()  # another activation grid: close, not equal
    with pytest.raises(ConfigError, match="activations must be learned, dynamic or none"):
        to_torchao(model, "static")


def test_convolutions_hold_their_codes_as_intx_tensors_and_compute_the_same():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.LazyLinear(4),
    )
    model(torch.randn(1, 3, 10, 10))
    quantize_(model, QuantConfig(weight=LSQConfig(bits=4), activation=default_activation_config(8), quantize_head=True))
    model.eval()
    x = torch.randn(5, 3, 10, 10)
    with torch.no_grad():
        model(x)  # activation steps
        want = model(x)
    converted, names = to_torchao(model, "learned")
    assert names == ["0", "2", "5"]
    layers = torchao_layers(converted)
    assert layers["0"] == layers["2"] == "torch.int4 codes in int8, dequantized float convolution"
    assert layers["5"] == "int8 weight, dequantized matmul"
    for name, module, _t, q in iter_quantized_weights(model):
        weight = converted.get_submodule(name).weight
        assert weight.qdata.dtype == torch.int8
        assert torch.equal(weight.qdata.to(torch.float32), q.integers(module.parametrizations.weight.original))
    with torch.no_grad():
        got = converted(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert "dynamic" not in torchao_layers(to_torchao(model)[0])["0"]  # convs keep the learned activations


def test_without_torchao_the_error_names_the_extra(monkeypatch):
    for name in [n for n in list(sys.modules) if n == "torchao" or n.startswith("torchao.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match=r"pip install 'dg-quant\[torchao\]'"):
        to_torchao(nn.Sequential(nn.Linear(4, 2)))
