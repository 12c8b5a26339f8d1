"""QT-DoG / LSQ plugins through the host-neutral Trainer: the switch-on and what trains after it."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from dg_quant import PluginHost, Trainer, create_adapter
from dg_quant.context import RunContext
from dg_quant.errors import ConfigError
from dg_quant.plugins.qat import QATOptions, resolve_start_step
from dg_quant.quant import (
    is_quantization_enabled,
    iter_quantized_weights,
    latent_weight,
    step_parameters,
)
from dg_quant.schedule import PAPER_START_STEP


def make_config(host: PluginHost, *argv: str, total_steps: int | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    host.add_options(parser)
    config = parser.parse_args(list(argv))
    host.configure(config, RunContext(total_steps=total_steps))
    return config


def build(plugin: str, *argv: str, total_steps: int | None = None) -> Trainer:
    torch.manual_seed(0)
    host = PluginHost([plugin])
    config = make_config(host, *argv, total_steps=total_steps)
    model = create_adapter("test_cnn", num_classes=3)
    return Trainer.build(
        host, model, config, lambda m: torch.optim.Adam(m.parameters(), lr=1e-2), nn.CrossEntropyLoss()
    )


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))


def snapshot(trainer: Trainer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    model = trainer.model
    steps = [p.detach().clone() for p in step_parameters(model)]
    weights = [latent_weight(m, t).detach().clone() for _, m, t, _ in iter_quantized_weights(model)]
    return steps, weights


def changed(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return all(not torch.equal(a, b) for a, b in zip(before, after))


def test_qtdog_switches_on_at_the_start_step_and_then_trains_steps_and_weights() -> None:
    trainer = build("dg_quant.qtdog", "--quant_start_step", "3")
    for _ in range(3):
        trainer.train_step(batch())
        assert not is_quantization_enabled(trainer.model)
    steps_before, weights_before = snapshot(trainer)
    trainer.train_step(batch())
    assert is_quantization_enabled(trainer.model)
    steps_switch, weights_switch = snapshot(trainer)
    assert changed(steps_before, steps_switch)  # re-initialised from the current weights, then trained
    trainer.train_step(batch())
    steps_after, weights_after = snapshot(trainer)
    assert changed(steps_switch, steps_after)
    assert changed(weights_switch, weights_after)


def test_switch_keeps_the_optimizer_state_of_the_weights() -> None:
    trainer = build("dg_quant.qtdog", "--quant_start_step", "2")
    weight = next(latent_weight(m, t) for _, m, t, _ in iter_quantized_weights(trainer.model))
    trainer.train_step(batch())
    trainer.train_step(batch())
    state_before = trainer.optimizer.state[weight]["step"].item()
    trainer.train_step(batch())
    assert trainer.optimizer.state[weight]["step"].item() == state_before + 1


def test_step_sizes_get_gradients_only_after_the_switch() -> None:
    trainer = build("dg_quant.qtdog", "--quant_start_step", "1")
    trainer.train_step(batch())
    assert all(p.grad is None for p in step_parameters(trainer.model))
    trainer.train_step(batch())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in step_parameters(trainer.model))


def test_compat_flag_reproduces_the_released_code() -> None:
    trainer = build("dg_quant.qtdog", "--quant_start_step", "1", "--qtdog_compat", "true")
    trainer.train_step(batch())
    trainer.train_step(batch())
    steps_before, weights_before = snapshot(trainer)
    head_before = trainer.model.classifier.weight.detach().clone()
    trainer.train_step(batch())
    steps_after, weights_after = snapshot(trainer)
    assert all(torch.equal(a, b) for a, b in zip(steps_before + weights_before, steps_after + weights_after))
    assert not torch.equal(head_before, trainer.model.classifier.weight)


def test_compat_quantizes_conv2d_only_even_where_a_linear_is_not_the_head() -> None:
    """The released code maps only Conv2d: a hidden Linear (not the excluded head) stays FP under
    --qtdog_compat, and is quantized without it."""
    from dg_quant.plugins.qat import prepare

    def net() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3)
        )

    compat, plain = net(), net()
    prepare(compat, QATOptions(qtdog_compat=True), start_step=0)
    prepare(plain, QATOptions(), start_step=0)
    assert [n for n, *_ in iter_quantized_weights(compat)] == ["0"]
    assert [n for n, *_ in iter_quantized_weights(plain)] == ["0", "3"]  # the hidden Linear; head "5" FP


def test_lsq_plugin_quantizes_from_the_first_step() -> None:
    trainer = build("dg_quant.lsq")
    assert is_quantization_enabled(trainer.model)
    trainer.train_step(batch())
    assert all(p.grad is not None for p in step_parameters(trainer.model))


def test_activation_bits_add_input_quantizers() -> None:
    trainer = build("dg_quant.lsq", "--act_bits", "4")
    names = [n for n, m in trainer.model.named_modules() if hasattr(m, "act_quantizer")]
    assert names and "classifier" not in names


@pytest.mark.parametrize(
    ("option", "total", "expected"),
    [(None, None, PAPER_START_STEP), (None, 10_000, PAPER_START_STEP), (None, 600, 240), (50, 600, 50)],
)
def test_start_step_defaults_follow_the_paper_scaled_to_short_runs(option, total, expected) -> None:
    assert resolve_start_step(QATOptions(quant_start_step=option), None, total) == expected


@pytest.mark.parametrize(
    ("dataset", "total", "expected"),
    [
        ("domainnet", None, 8000),
        ("DomainNet", 15000, 8000),
        ("domainnet", 7500, 4000),
        ("pacs", 15000, 2000),
        ("DomainNet", 5001, 2667),
    ],
)
def test_start_step_defaults_per_dataset(dataset, total, expected) -> None:
    """The paper switches on at step 8,000 of 15,000 on DomainNet and 2,000 of 5,000 elsewhere."""
    assert resolve_start_step(QATOptions(), None, total, dataset) == expected


def test_bits_out_of_range_fail_at_configure() -> None:
    host = PluginHost(["dg_quant.qtdog"])
    with pytest.raises(ConfigError, match="bits"):
        make_config(host, "--bits", "9")
