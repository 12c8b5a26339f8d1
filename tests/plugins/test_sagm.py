"""SAGM's two-pass step (docs/methods.md 6) against a direct computation, and the plugin in both hosts' loop."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

from dg_quant.adapters.wilds.cli import main
from dg_quant.errors import ConfigError
from dg_quant.host import PluginHost
from dg_quant.loop import Trainer
from dg_quant.options import read_options
from dg_quant.quant.norm_stats import frozen_bn_stats
from dg_quant.sharpness import SAGMOptions, apply_sagm_, sagm_gradients


def tiny_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def direct_sagm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rho: float, alpha: float):
    """g at θ, θ' = θ + ρ·g/‖g‖ − α·g, g' at θ' — written out with functional_call on a copy."""
    ref = copy.deepcopy(model)
    params = {n: p.detach().clone().requires_grad_() for n, p in ref.named_parameters()}
    loss = nn.functional.cross_entropy(functional_call(ref, params, (x,)), y)
    g = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
    moved = {n: (params[n] + rho * g[n] / norm - alpha * g[n]).detach().requires_grad_() for n in params}
    loss_p = nn.functional.cross_entropy(functional_call(ref, moved, (x,)), y)
    g_p = dict(zip(moved, torch.autograd.grad(loss_p, list(moved.values()))))
    return g, g_p, loss.detach(), loss_p.detach()


def test_sagm_gradient_matches_direct_computation() -> None:
    model, (x, y) = tiny_net(), batch()
    g, g_p, loss, loss_p = direct_sagm(model, x, y, rho=0.05, alpha=0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    result = sagm_gradients(model, (x, y), nn.functional.cross_entropy, rho=0.05, alpha=0.01)
    apply_sagm_(result)

    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 0.5 * (g[name] + g_p[name]), rtol=1e-5, atol=1e-7)
        assert torch.equal(p.detach(), before[name]), f"{name} not restored exactly"
    torch.testing.assert_close(result.loss, loss)
    torch.testing.assert_close(result.perturbed_loss, loss_p)
    assert result.perturbed_loss > result.loss  # the ascent direction raises the loss


def test_sgd_step_moves_by_half_the_sum_of_both_gradients() -> None:
    model, (x, y) = tiny_net(), batch()
    g, g_p, _, _ = direct_sagm(model, x, y, rho=0.1, alpha=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    apply_sagm_(sagm_gradients(model, (x, y), nn.functional.cross_entropy, rho=0.1, alpha=0.0))
    optimizer.step()
    for name, p in model.named_parameters():
        expected = before[name] - 0.1 * 0.5 * (g[name] + g_p[name])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)


def test_perturbed_pass_leaves_batchnorm_statistics_alone() -> None:
    model, (x, y) = tiny_net(), batch()
    once = copy.deepcopy(model)
    once(x)  # a single clean training forward
    sagm_gradients(model, (x, y), nn.functional.cross_entropy, rho=0.05, alpha=0.001)
    bn, bn_once = model[1], once[1]
    assert torch.equal(bn.running_mean, bn_once.running_mean)
    assert torch.equal(bn.running_var, bn_once.running_var)
    assert int(bn.num_batches_tracked) == 1


def test_frozen_bn_stats_normalises_with_batch_stats_and_keeps_buffers_after_many_passes() -> None:
    model, (x, _) = tiny_net(), batch()
    reference = copy.deepcopy(model)  # an ordinary training-mode forward: batch statistics
    saved = copy.deepcopy(model[1].state_dict())
    with frozen_bn_stats(model):
        for _ in range(3):
            assert torch.equal(model(x * 3 + 1), reference(x * 3 + 1))
    assert not torch.equal(reference[1].running_mean, saved["running_mean"])  # it did update
    for key, value in saved.items():
        assert torch.equal(model[1].state_dict()[key], value)
    assert model[1].track_running_stats


def test_frozen_bn_stats_restores_norms_that_update_their_buffers_anyway() -> None:
    norm = nn.InstanceNorm1d(4, affine=True, track_running_stats=True)
    saved = copy.deepcopy(norm.state_dict())
    with frozen_bn_stats(norm):
        norm(torch.randn(8, 4, 5) * 3 + 1)
        assert not torch.equal(norm.running_mean, saved["running_mean"])
    for key, value in saved.items():
        assert torch.equal(norm.state_dict()[key], value)


def test_perturb_filter_keeps_excluded_parameters_in_place() -> None:
    model, (x, y) = tiny_net(), batch()
    head = model[3].weight
    seen: list[torch.Tensor] = []
    model[3].register_forward_pre_hook(lambda m, _args: seen.append(m.weight.detach().clone()))
    result = sagm_gradients(model, (x, y), nn.functional.cross_entropy, 0.05, 0.0, perturb=lambda p: p is not head)
    assert torch.equal(seen[0], seen[1])  # the head was not moved for the second pass
    moved = [g for p, g in zip(result.params, result.task) if p is not head]
    torch.testing.assert_close(result.grad_norm, torch.linalg.vector_norm(torch.cat([g.flatten() for g in moved])))
    assert all(f is not None for f in result.flat)  # the excluded parameter still gets g'


def test_options_validate() -> None:
    with pytest.raises(ConfigError, match="rho"):
        SAGMOptions(rho=0.0)
    with pytest.raises(ConfigError, match="alpha"):
        SAGMOptions(alpha=-1.0)


def test_plugin_replaces_the_default_step_in_the_host_neutral_loop() -> None:
    host = PluginHost(["dg_quant.sagm"])
    parser = argparse.ArgumentParser()
    host.add_options(parser)
    config = parser.parse_args(["--rho", "0.1", "--alpha", "0.02"])
    host.configure(config)
    assert read_options(SAGMOptions, config) == SAGMOptions(rho=0.1, alpha=0.02)
    model, (x, y) = tiny_net(), batch()
    g, g_p, _, _ = direct_sagm(model, x, y, rho=0.1, alpha=0.02)
    trainer = Trainer.build(
        host, model, config, lambda m: torch.optim.SGD(m.parameters(), lr=0.0), nn.functional.cross_entropy
    )
    metrics = trainer.train_step((x, y))
    assert {"loss", "sagm/perturbed_loss", "sagm/grad_norm", "sagm/surrogate_gap"} <= set(metrics)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 0.5 * (g[name] + g_p[name]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("plugins", [["dg_quant.sagm"], ["dg_quant.lsq", "dg_quant.sagm"]], ids=["fp", "lsq+sagm"])
def test_wilds_run_with_sagm(tmp_path, plugins) -> None:
    argv = [a for p in plugins for a in ("--plugin", p)]
    argv += [
        "--n_steps",
        "20",
        "--eval_every",
        "20",
        "--frac",
        "0.3",
        "--batch_size",
        "32",
        "--no_progress",
        "--log_dir",
        str(tmp_path),
    ]
    assert main(argv) == 0
    record = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[-1])
    assert record["train/sagm/perturbed_loss"] > 0
    assert record["quantized"] == ("dg_quant.lsq" in plugins)
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["steps"] == 20 and final["plugins"] == plugins


def _sagm_bookkeeping_ops(n_layers: int, monkeypatch) -> int:
    """ATen ops of one SAGM step beyond its two forward/backward passes."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    from benchmarks.measure import aten_ops

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(n_layers)])
    x, y = torch.randn(4, 8), torch.randint(0, 8, (4,))

    def two_passes() -> None:
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()

    def sagm_step() -> None:
        apply_sagm_(sagm_gradients(model, (x, y), nn.functional.cross_entropy, 0.05, 0.001))

    return aten_ops(sagm_step) - aten_ops(two_passes)


def test_sagm_bookkeeping_does_not_grow_with_the_number_of_parameters(monkeypatch) -> None:
    """Norm, perturbation, restore and combination are multi-tensor ops: a fixed handful of GPU
    launches per step rather than several per parameter (it was about 7 per parameter)."""
    small, large = _sagm_bookkeeping_ops(4, monkeypatch), _sagm_bookkeeping_ops(32, monkeypatch)
    assert small <= 16 and large - small <= 2, (small, large)  # 56 more parameters
