"""Fused quantized conv/linear layers: same numbers as the parametrized path, no fake-quantized weight saved."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
from torch import nn

from dg_quant import PluginHost, Trainer, create_adapter
from dg_quant.quant import LSQConfig, QuantConfig, quantize_
from dg_quant.quant import fused as fused_module
from dg_quant.quant import lsq as lsq_module
from dg_quant.quant.api import iter_quantizers, set_compiled_kernels


def _quantized(layer: nn.Module, bits: int, granularity: str) -> nn.Sequential:
    config = QuantConfig(
        weight=LSQConfig(bits=bits, granularity=granularity, mode="signed"), activation=None, quantize_head=True
    )
    return quantize_(nn.Sequential(layer), config)


def _plain_reference(model: nn.Module) -> nn.Module:
    """A copy whose quantizers carry a hook: the fused path steps aside for the parametrized one."""
    ref = copy.deepcopy(model)
    for _, q in iter_quantizers(ref):
        q.register_forward_hook(lambda *_: None)
    return ref


def _outputs_and_grads(model: nn.Module, x: torch.Tensor, autocast: torch.dtype | None = None) -> list:
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        y = model(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype))
    layer = model[0]
    grads = [
        y.detach(),
        x.grad,
        layer.parametrizations.weight.original.grad,
        layer.parametrizations.weight[0].step.grad,
    ]
    return grads + ([layer.bias.grad] if layer.bias is not None else [])


LAYERS = {
    "conv2d": (lambda: nn.Conv2d(8, 16, 3, padding=1), (2, 8, 9, 9)),
    "conv2d_grouped_strided": (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4, bias=False), (2, 8, 9, 9)),
    "depthwise": (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (2, 8, 7, 7)),
    "conv1d_dilated": (lambda: nn.Conv1d(4, 6, 3, dilation=2), (2, 4, 20)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3), (1, 2, 5, 5, 5)),
    "linear_3d_input": (lambda: nn.Linear(12, 5), (3, 7, 12)),
    "linear_no_bias": (lambda: nn.Linear(12, 5, bias=False), (3, 12)),
}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize(("bits", "granularity"), [(2, "per_channel"), (4, "per_tensor"), (7, "per_channel")])
def test_fused_layer_matches_the_parametrized_path(kind: str, bits: int, granularity: str) -> None:
    make, shape = LAYERS[kind]
    model = _quantized(make(), bits, granularity)
    assert type(model[0]).forward is fused_module._fused_forward
    x = torch.randn(shape)
    for got, want in zip(_outputs_and_grads(model, x), _outputs_and_grads(_plain_reference(model), x), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", ["conv2d", "linear_3d_input"])
def test_fused_layer_under_bf16_autocast_matches_and_keeps_dtypes(kind: str) -> None:
    make, shape = LAYERS[kind]
    model = _quantized(make(), 4, "per_channel")
    x = torch.randn(shape)
    got = _outputs_and_grads(model, x, torch.bfloat16)
    want = _outputs_and_grads(_plain_reference(model), x, torch.bfloat16)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)


def _saved_storages(model: nn.Module, x: torch.Tensor) -> set[int]:
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return seen


def test_fused_layer_keeps_no_fake_quantized_weight_for_backward() -> None:
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    model = quantize_(copy.deepcopy(fp), QuantConfig(weight=LSQConfig(bits=4), quantize_head=True))
    x = torch.randn(2, 3, 8, 8)
    steps = {q.step.untyped_storage().data_ptr() for _, q in iter_quantizers(model)}
    latent = {p.untyped_storage().data_ptr() for n, p in model.named_parameters() if n.endswith("original")}
    saved = _saved_storages(model, x)
    assert latent <= saved and steps <= saved
    # FP saves activations and weights; the fused model saves the same plus the steps, nothing else.
    assert len(saved) == len(_saved_storages(fp, x)) + len(steps)
    # The parametrized path keeps one more tensor per layer: its fake-quantized weight.
    assert len(_saved_storages(_plain_reference(model), x)) == len(saved) + 2


def test_fused_path_steps_aside_where_it_would_not_be_the_same_computation() -> None:
    model = _quantized(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), 4, "per_channel")
    x = torch.randn(1, 4, 6, 6)
    for got, want in zip(_outputs_and_grads(model, x), _outputs_and_grads(_plain_reference(model), x), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Switched off, the layer is the FP layer on the latent weight.
    model = _quantized(nn.Linear(6, 3), 4, "per_channel")
    quantizer = next(q for _, q in iter_quantizers(model))
    quantizer.enabled = False
    latent = model[0].parametrizations.weight.original
    x = torch.randn(2, 6)
    torch.testing.assert_close(model(x), nn.functional.linear(x, latent, model[0].bias), rtol=0, atol=0)
    # The state_dict keys are those of the parametrized model.
    assert "0.parametrizations.weight.original" in model.state_dict()


def test_compiled_kernels_flag_reaches_the_fused_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """set_compiled_kernels routes the fused layer's weight kernels too (checked without compiling)."""
    calls = []

    def eager_instead(x, s, qn, qp):
        calls.append(tuple(x.shape))
        return torch.div(x, s).clamp_(-qn, qp).round_().mul_(s)

    monkeypatch.setattr(lsq_module, "_compiled_forward", eager_instead)
    monkeypatch.setattr(lsq_module, "_compiled_backward", lambda x, s, g, qn, qp: (g, s.new_zeros(s.shape)))
    monkeypatch.setattr(lsq_module, "COMPILED_MIN_NUMEL", 0)  # this weight is small: eager would be faster
    model = _quantized(nn.Linear(6, 3), 4, "per_channel")
    set_compiled_kernels(model)
    model(torch.randn(2, 6, requires_grad=True)).sum().backward()
    assert calls == [(3, 6), (3, 6)]  # forward, and the recomputation in backward


def test_small_tensors_keep_the_eager_kernels_when_compiled_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below COMPILED_MIN_NUMEL the compiled call's dispatch costs more than the eager pass: eager runs."""
    monkeypatch.setattr(lsq_module, "_compiled_forward", lambda *a: pytest.fail("compiled kernel on a small tensor"))
    model = _quantized(nn.Linear(6, 3), 4, "per_channel")
    set_compiled_kernels(model)
    q = model[0].parametrizations.weight[0]
    assert (
        q.compiled and not q.kernels_for(model[0].weight) and q.kernels_for(torch.empty(lsq_module.COMPILED_MIN_NUMEL))
    )
    model(torch.randn(2, 6, requires_grad=True)).sum().backward()


def _qtdog_trainer() -> Trainer:
    torch.manual_seed(0)
    host = PluginHost(["dg_quant.qtdog"])
    parser = argparse.ArgumentParser()
    host.add_options(parser)
    config = parser.parse_args(["--quant_start_step", "0", "--bits", "4"])
    config.total_steps = 4
    host.configure(config)
    model = create_adapter("digits_cnn", num_classes=10)
    return Trainer.build(
        host, model, config, lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), nn.CrossEntropyLoss()
    )


def test_qtdog_training_is_the_same_with_and_without_the_fused_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(16, 1, 16, 16, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(4)
    ]
    fused = _qtdog_trainer()
    with monkeypatch.context() as patch:
        patch.setattr(fused_module, "install", lambda module: False)
        plain = _qtdog_trainer()
    for batch in batches:
        fused.train_step(batch)
        plain.train_step(batch)
    assert any(type(m).forward is fused_module._fused_forward for m in fused.model.modules())
    assert not any(type(m).forward is fused_module._fused_forward for m in plain.model.modules())
    a, b = fused.model.state_dict(), plain.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
