"""OBQ and GPTQ layer solvers and the ``ptq_`` driver on small real layers and a trained CNN."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dg_quant.errors import ConfigError
from dg_quant.quant import compression_report, iter_quantized_weights, latent_weight
from dg_quant.quant.gptq import GPTQ
from dg_quant.quant.obc import OBQ, PTQConfig, ptq_, reestimate_bn, summarize
from dg_quant.registry import create_adapter


def _correlated_inputs(n: int, d: int) -> torch.Tensor:
    mix = torch.randn(d, d) / d**0.5 + torch.eye(d)
    return torch.randn(n, d) @ mix


@pytest.mark.parametrize("solver_cls", [OBQ, GPTQ])
def test_linear_solver_beats_round_to_nearest_and_lands_on_grid(solver_cls):
    layer = nn.Linear(24, 10)
    x = _correlated_inputs(512, 24)
    solver = solver_cls(layer, bits=3, name="fc", damp=0.0)
    for chunk in x.split(100):
        solver.add_batch(chunk, None)
    w0 = layer.weight.detach().double().clone()
    result = solver.quantize()
    assert result.error < result.rtn_error
    # the reported error is the measured output error on the calibration inputs
    dq = w0 - layer.weight.detach().double()
    measured = ((x.double() @ dq.T) ** 2).sum(dim=1).mean()
    assert result.error == pytest.approx(float(measured), rel=1e-6)
    codes = layer.weight.detach().double() / solver.step.unsqueeze(1)
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= -4 and codes.round().max() <= 3  # signed 3-bit grid


def test_gptq_lazy_blocks_equal_column_by_column():
    x = _correlated_inputs(256, 40)
    results = []
    for blocksize in (1, 16, 128):
        layer = nn.Linear(40, 6)
        torch.nn.init.normal_(layer.weight, generator=torch.Generator().manual_seed(3))
        solver = GPTQ(layer, bits=4, blocksize=blocksize)
        solver.add_batch(x)
        solver.quantize()
        results.append(layer.weight.detach().clone())
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_conv_hessian_via_unfold_matches_the_convolution():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1, bias=True)
    x = torch.randn(6, 3, 9, 9)
    solver = GPTQ(conv, bits=3)
    solver.add_batch(x[:4])
    solver.add_batch(x[4:])
    w0 = conv.weight.detach().clone()
    result = solver.quantize()
    diff = F.conv2d(x.double(), (w0 - conv.weight.detach()).double(), stride=2, padding=1)
    measured = (diff**2).flatten(1).sum(dim=1).mean()  # per image, summed over positions
    assert result.error == pytest.approx(float(measured), rel=1e-6)
    assert result.error < result.rtn_error


def test_obq_not_worse_than_gptq_on_small_layer():
    x = _correlated_inputs(400, 16)
    errors = {}
    for cls in (OBQ, GPTQ):
        layer = nn.Linear(16, 8)
        torch.nn.init.normal_(layer.weight, generator=torch.Generator().manual_seed(5))
        solver = cls(layer, bits=2, damp=0.0)
        solver.add_batch(x)
        errors[cls.method] = solver.quantize().error
    assert errors["obq"] <= errors["gptq"] * 1.05


def test_grouped_conv_and_unknown_layers_are_rejected():
    with pytest.raises(ConfigError):
        GPTQ(nn.Conv2d(4, 4, 3, groups=2), bits=4)
    with pytest.raises(ConfigError):
        PTQConfig(method="adaround")


def _trained_cnn(steps: int = 30):
    model = create_adapter("test_cnn", num_classes=4, width=8)
    # smooth images (neighbouring pixels correlate, as in real ones)
    x = F.interpolate(torch.randn(64, 3, 4, 4), size=12, mode="bilinear", align_corners=False)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long() + 2 * (x[:, 1].mean(dim=(1, 2)) > 0).long()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    return _trained_cnn()


@pytest.mark.parametrize("method", ["obc", "gptq"])
def test_ptq_on_trained_model_beats_rtn_every_layer(method, trained):
    model, x = copy.deepcopy(trained)
    batches = lambda: x.split(32)  # noqa: E731
    results = ptq_(model, batches, PTQConfig(method=method, bits=4, quantize_head=True))
    assert [r.name for r in results] == ["featurizer.0", "featurizer.3", "classifier"]
    for r in results:
        assert r.error < r.rtn_error, r
    if method == "obc":
        assert [r.method for r in results] == ["obq", "obq", "obq"]  # all layers small here
    summary = summarize(results)
    assert summary["ptq/layers_better_than_rtn"] == 3
    # quantizers hold the solved grid: fake-quant leaves the (already on-grid) weights unchanged
    for _, module, tensor, q in iter_quantized_weights(model):
        assert q.enabled and q.bits == 4
        assert torch.equal(getattr(module, tensor), latent_weight(module, tensor))
    assert len(compression_report(model).layers) == 3


def test_ptq_refuses_an_already_quantized_model():
    from dg_quant.quant import quantize_

    model, x = _trained_cnn(steps=1)
    quantize_(model)
    with pytest.raises(ConfigError, match="already quantized"):
        ptq_(model, lambda: [x])


def test_bn_reestimation_uses_calibration_statistics():
    model, x = _trained_cnn(steps=1)
    model.eval()
    bn = model.featurizer[1]
    captured = []
    handle = bn.register_forward_pre_hook(lambda _m, inp: captured.append(inp[0].detach()))
    assert reestimate_bn(model, lambda: x.split(64)) == 2
    handle.remove()
    feats = torch.cat(captured)
    assert torch.allclose(bn.running_mean, feats.mean(dim=(0, 2, 3)), atol=1e-5)
    assert not bn.training and bn.momentum == 0.1


def test_ptq_through_disabled_quantizers_equals_plain_ptq(trained):
    from dg_quant.quant.obc import attach_disabled_quantizers

    config = PTQConfig(method="gptq", bits=3)
    plain, x = copy.deepcopy(trained)
    prepared, _ = copy.deepcopy(trained)
    assert attach_disabled_quantizers(prepared, config) == ["featurizer.0", "featurizer.3"]
    with torch.no_grad():
        assert torch.equal(prepared.eval()(x), plain.eval()(x))  # off quantizers are the identity
    ptq_(plain, lambda: x.split(32), config)
    ptq_(prepared, lambda: x.split(32), config)
    with torch.no_grad():
        assert torch.equal(prepared(x), plain(x))
    assert all(q.enabled for *_, q in iter_quantized_weights(prepared))
