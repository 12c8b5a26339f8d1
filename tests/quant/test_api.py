"""``quantize_``: which modules get quantizers, and what switching them does."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dg_quant.errors import ConfigError
from dg_quant.quant import (
    LSQConfig,
    QuantConfig,
    bake_,
    compression_report,
    default_activation_config,
    iter_quantized_weights,
    latent_weight,
    plan,
    quantize_,
    set_quantization,
    step_parameters,
)
from dg_quant.quant.mha import QuantizableMHA


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.block(self.stem(x))).flatten(1)
        return self.fc(torch.relu(self.proj(x)))


def quantized_names(model: nn.Module) -> set[str]:
    return {name for name, *_ in iter_quantized_weights(model)}


def act_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if hasattr(m, "act_quantizer")}


def test_default_policy_quantizes_every_conv_and_linear_except_the_head() -> None:
    model = quantize_(Net())
    assert quantized_names(model) == {"stem", "block.0", "proj"}
    assert act_names(model) == set()


def test_include_exclude_patterns_and_explicit_head() -> None:
    model = quantize_(Net(), QuantConfig(include=("block.*", "proj", "fc"), exclude=("proj",), head="proj"))
    assert quantized_names(model) == {"block.0", "fc"}


def test_head_can_be_quantized_on_request() -> None:
    assert "fc" in quantized_names(quantize_(Net(), QuantConfig(quantize_head=True)))


@pytest.mark.parametrize(
    ("policy", "weights", "acts"),
    [
        ("full", {"stem", "block.0", "proj"}, {"stem", "block.0", "proj"}),
        ("fp", {"block.0", "proj"}, {"block.0", "proj"}),
        ("activations_only", {"block.0", "proj"}, {"stem", "block.0", "proj"}),
    ],
)
def test_first_layer_policies(policy: str, weights: set[str], acts: set[str]) -> None:
    cfg = QuantConfig(activation=default_activation_config(8), first_layer=policy)
    model = quantize_(Net(), cfg)
    assert quantized_names(model) == weights
    assert act_names(model) == acts


def test_filter_fn_vetoes_modules() -> None:
    model = quantize_(Net(), filter_fn=lambda m, name: isinstance(m, nn.Conv2d))
    assert quantized_names(model) == {"stem", "block.0"}


def test_parameters_are_kept_so_an_existing_optimizer_still_trains_them() -> None:
    model = Net()
    weight = model.stem.weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    quantize_(model)
    assert latent_weight(model.stem, "weight") is weight
    before = weight.detach().clone()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    assert not torch.equal(weight, before)


def test_quantized_forward_uses_quantized_weights_and_inputs() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    reference = copy.deepcopy(model)
    quantize_(model, QuantConfig(weight=LSQConfig(bits=2), activation=default_activation_config(2)))
    y = model(x)
    assert not torch.allclose(y, reference(x))
    # The stem sees a 2-bit input: at most 2**2 distinct values per sign pattern.
    seen = {}

    def record(_module, args, _out) -> None:
        seen["x"] = args[0]

    model.stem.register_forward_hook(record)
    model(x)
    assert seen["x"].unique().numel() <= 4
    w = model.stem.weight
    step = model.stem.parametrizations.weight[0].step
    assert (w / step).sub((w / step).round()).abs().max() < 1e-5


def test_attention_input_projection_is_quantized() -> None:
    attn = nn.MultiheadAttention(16, 2)
    model = nn.Sequential()
    model.add_module("attn", attn)
    model.add_module("head", nn.Linear(16, 3))
    quantize_(model)
    names = {(n, t) for n, _m, t, _q in iter_quantized_weights(model)}
    assert names == {("attn", "in_proj_weight"), ("attn.out_proj", "weight")}
    x = torch.randn(5, 2, 16)
    out, _ = attn(x, x, x)
    assert out.shape == (5, 2, 16)


@pytest.mark.parametrize("batch_first", [False, True])
def test_attention_output_projection_input_is_quantized_too(batch_first: bool) -> None:
    """MHA reads out_proj.weight directly; with an activation quantizer on out_proj the layer
    becomes a QuantizableMHA that calls out_proj, so that quantizer runs."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(16, 2, batch_first=batch_first))
    model.add_module("head", nn.Linear(16, 3))
    reference = copy.deepcopy(model.attn)
    quantize_(model, QuantConfig(activation=default_activation_config(8), enabled=False))
    attn = model.attn
    assert isinstance(attn, QuantizableMHA) and isinstance(reference, nn.MultiheadAttention)
    assert list(attn.state_dict()) != [] and hasattr(attn.out_proj, "act_quantizer")
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    torch.testing.assert_close(attn(x, x, x, need_weights=False)[0], reference(x, x, x, need_weights=False)[0])
    set_quantization(model, True)
    seen = []
    attn.out_proj.act_quantizer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    out, _ = attn(x, x, x, need_weights=False)
    assert attn.out_proj.act_quantizer.initialized and len(seen) == 1
    assert seen[0].unique().numel() <= 2**8  # the attention output reached out_proj quantized
    assert attn(x, x, x)[1] is not None  # need_weights: the parent's path, unchanged contract


def test_switch_on_reinitialises_steps_from_current_weights() -> None:
    model = quantize_(Net(), QuantConfig(enabled=False))
    x = torch.randn(2, 3, 8, 8)
    fp = model(x)
    with torch.no_grad():
        model.stem.parametrizations.weight.original.mul_(3)
    old_step = model.stem.parametrizations.weight[0].step.detach().clone()
    assert set_quantization(model, True) == 3
    torch.testing.assert_close(model.stem.parametrizations.weight[0].step.detach(), old_step * 3)
    assert not torch.allclose(model(x), fp * 1)


def test_calling_twice_is_an_error() -> None:
    model = quantize_(Net())
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_(model)


def test_unknown_head_is_an_error() -> None:
    with pytest.raises(ConfigError, match="not a module"):
        quantize_(Net(), QuantConfig(head="classifier"))


def test_state_dict_round_trip_restores_quantized_outputs() -> None:
    torch.manual_seed(0)
    cfg = QuantConfig(weight=LSQConfig(bits=3), activation=default_activation_config(4))
    a = quantize_(Net(), cfg)
    x = torch.randn(2, 3, 8, 8)
    a(x)  # initialises the activation steps
    b = quantize_(Net(), cfg)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.eval()(x), b.eval()(x))


def test_bake_leaves_a_plain_model_with_grid_weights() -> None:
    torch.manual_seed(0)
    model = quantize_(Net(), QuantConfig(weight=LSQConfig(bits=4))).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    bake_(model)
    assert list(iter_quantized_weights(model)) == []
    assert isinstance(model.stem.weight, nn.Parameter)
    torch.testing.assert_close(model(x), expected)


def test_compression_report_counts_bits_and_scales() -> None:
    model = quantize_(Net(), QuantConfig(weight=LSQConfig(bits=7)))
    report = compression_report(model)
    quantized = {"stem.weight": model.stem, "block.0.weight": model.block[0], "proj.weight": model.proj}
    q_numel = sum(m.parametrizations.weight.original.numel() for m in quantized.values())
    scales = sum(m.parametrizations.weight[0].step.numel() for m in quantized.values())
    fp = Net()
    fp_numel = sum(p.numel() for p in fp.parameters()) - q_numel
    buffers = sum(b.numel() * b.element_size() for b in fp.buffers() if b.is_floating_point())
    assert report.fp32_bytes == 4 * (q_numel + fp_numel) + buffers
    assert report.packed_bytes == -(-(q_numel * 7 + scales * 32 + fp_numel * 32) // 8) + buffers
    assert report.ratio == pytest.approx(report.fp32_bytes / report.packed_bytes)
    assert [layer.name for layer in report.layers] == list(quantized)


def test_disabled_quantizers_do_not_count_as_compressed() -> None:
    model = quantize_(Net(), QuantConfig(enabled=False))
    assert compression_report(model).ratio == pytest.approx(1.0)
    assert len(step_parameters(model)) == 3


def test_plan_reports_decisions_without_touching_the_model() -> None:
    model = Net()
    decisions = plan(model, QuantConfig(activation=default_activation_config(8), first_layer="activations_only"))
    assert decisions == {"stem": (False, True), "block.0": (True, True), "proj": (True, True)}
    assert list(iter_quantized_weights(model)) == []
