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
from dg_quant.deploy.torchao import to_torchao  # noqa: E402


def _vit(act_bits: int | None) -> nn.Module:
    from dg_quant.registry import create_adapter

    torch.manual_seed(0)
    model = create_adapter("test_deit", num_classes=5)
    act = default_activation_config(act_bits) if act_bits else None
    quantize_(
        model, QuantConfig(weight=LSQConfig(bits=6), activation=act), filter_fn=model.quant_policy.filter_fn(model)
    )
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
    assert set(names) == linears and names
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


def test_without_torchao_the_error_names_the_extra(monkeypatch):
    for name in [n for n in list(sys.modules) if n == "torchao" or n.startswith("torchao.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match=r"pip install 'dg-quant\[torchao\]'"):
        to_torchao(nn.Sequential(nn.Linear(4, 2)))
