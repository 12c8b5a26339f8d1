"""FQAT (docs/methods.md 7): the disorder metric, the freezing rule, gradient routing, and a wilds_run."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from dg_quant.adapters.wilds.cli import main, parse_config
from dg_quant.adapters.wilds.runner import run
from dg_quant.context import RunContext
from dg_quant.errors import ConfigError, DataError, PluginError
from dg_quant.hookimpl import hookimpl
from dg_quant.host import PluginHost
from dg_quant.io import read_jsonl
from dg_quant.options import option_search_space
from dg_quant.plugins.fqat.disorder import (
    Window,
    freeze_mask,
    gradient_disorder,
    observe,
    observe_all,
    sign_disagreement,
    window_disorder,
)
from dg_quant.plugins.fqat.options import FQATOptions
from dg_quant.plugins.fqat.plot import disorder_frame, plot_disorder
from dg_quant.plugins.fqat.routing import scale_gradient, scale_gradients
from dg_quant.plugins.fqat.run import FQATRun, hessian_batches, scale_label
from dg_quant.quant import iter_quantizers
from dg_quant.quant.ewgs import hessian_deltas
from dg_quant.sharpness import SAGMOptions

T = torch.tensor

# -- the disorder metric on hand-made sequences ---------------------------------------------


def test_disorder_of_hand_made_sequences() -> None:
    constant = [T([0.3]), T([0.1]), T([2.0]), T([0.5])]
    alternating = [T([1.0]), T([-1.0]), T([1.0]), T([-1.0]), T([1.0])]
    two_flips = [T([1.0]), T([1.0]), T([-1.0]), T([-1.0]), T([1.0])]  # flips at 3 and 5 of 4 pairs
    assert gradient_disorder(constant).item() == 0.0
    assert gradient_disorder(alternating).item() == 1.0
    assert gradient_disorder(two_flips).item() == 0.5
    assert gradient_disorder([T([0.0]), T([1.0])]).item() == 1.0  # a zero gradient has no sign


def test_per_channel_disorder_is_averaged_or_kept_per_element() -> None:
    # channel 0 never flips, channel 1 always, channel 2 once in 3 pairs
    seq = [T([1.0, 1.0, 1.0]), T([2.0, -1.0, 1.0]), T([1.0, 1.0, -1.0]), T([3.0, -1.0, -1.0])]
    torch.testing.assert_close(gradient_disorder(seq, "per_element"), T([0.0, 1.0, 1 / 3]))
    assert gradient_disorder(seq).item() == pytest.approx(4 / 9)
    with pytest.raises(ValueError, match="at least 2"):
        gradient_disorder(seq[:1])


def test_streaming_window_equals_the_window_formula() -> None:
    torch.manual_seed(5)
    grads = [torch.randn(6) for _ in range(9)]
    window = Window()
    for g in grads:
        observe(window, g, None, "task")
    assert window.pairs == 8
    torch.testing.assert_close(window_disorder(window, "per_element"), gradient_disorder(grads, "per_element"))
    flats = [torch.randn(6) for _ in range(9)]
    smooth, versus = Window(), Window()
    for g, f in zip(grads, flats):
        observe(smooth, g, f, "smooth")
        observe(versus, g, f, "task_vs_smooth")
    torch.testing.assert_close(window_disorder(smooth), gradient_disorder(flats))
    torch.testing.assert_close(window_disorder(versus), sign_disagreement(grads, flats))
    assert window_disorder(Window()) is None


def test_freeze_rule_and_its_reverse() -> None:
    d = T([0.1, 0.3, 0.6])
    assert freeze_mask(d, 0.3).tolist() == [True, False, False]
    assert freeze_mask(d, 0.3, "above_tau").tolist() == [False, True, True]


# -- options --------------------------------------------------------------------------------


def test_fqat_defaults_follow_the_paper() -> None:
    o = FQATOptions()
    assert (o.bits, o.act_bits, o.first_layer, o.quantize_head) == (4, 4, "activations_only", False)
    assert (o.weight_init, o.act_init, o.quant_start_step) == ("mse", "mse", 0)
    assert FQATOptions(bits=5).act_bits == 5 and FQATOptions(bits=5, act_bits=8).act_bits == 8
    for bad in ({"freeze_steps": 1}, {"freeze_tau": 1.5}, {"rho": 0.0}, {"qtdog_compat": True}):
        with pytest.raises(ConfigError):
            FQATOptions(**bad)


@pytest.mark.parametrize(
    ("cls", "searched"),
    [
        (FQATOptions, {"bits", "freeze_steps", "freeze_tau"}),  # ρ fixed as in SAM, α per dataset
        (SAGMOptions, {"rho", "alpha"}),
    ],
)
def test_search_samplers_draw_plain_scalars(cls, searched) -> None:
    rng = np.random.RandomState(0)
    drawn = {name: fn(rng) for name, fn in option_search_space(cls).items() if fn is not None}
    assert set(drawn) == searched
    assert all(type(v) in (int, float, str, bool) for v in drawn.values())
    cls(**drawn)  # every draw is a valid setting


@pytest.mark.parametrize("other", ["dg_quant.sagm", "dg_quant.lsq"])
def test_fqat_refuses_a_second_quantizer_or_step(other: str) -> None:
    with pytest.raises(PluginError, match=f"dg_quant.fqat and --plugin {other} cannot run together"):
        PluginHost(["dg_quant.fqat", other])


# -- gradient routing on a tiny model -------------------------------------------------------


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def make_run(**overrides) -> tuple[FQATRun, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    options = FQATOptions(**overrides)
    run = FQATRun(options, RunContext(), start_step=options.quant_start_step or 0)
    model = tiny_model()
    run.dgq_configure_model(model)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 2, 6, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    with torch.no_grad():
        model(x)  # initialise the activation steps
    return run, model, (x, y)


def reference_gradients(model: nn.Module, batch, rho: float, alpha: float, move_steps: bool = True):
    """g_QAT and g_flat by name, computed on a copy with plain autograd."""
    ref = copy.deepcopy(model)
    x, y = batch
    named = dict(ref.named_parameters())
    nn.functional.cross_entropy(ref(x), y).backward()
    task = {n: p.grad.clone() for n, p in named.items()}
    moved = [n for n in named if move_steps or not n.endswith(".step")]
    norm = torch.sqrt(sum((task[n] ** 2).sum() for n in moved))
    with torch.no_grad():
        for n in moved:
            named[n].add_(task[n] * (rho / norm - alpha))
    ref.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(ref(x), y).backward()
    return task, {n: p.grad.clone() for n, p in named.items()}


def test_frozen_scale_factors_get_only_the_flatness_gradient() -> None:
    run, model, batch = make_run(rho=0.05, alpha=0.001)
    assert set(run.scales) == {"0.act", "3.weight", "3.act"}  # first conv: input only; head FP
    run.frozen["0.act"] = torch.ones(1, dtype=torch.bool)
    run.frozen["3.weight"] = T([True, False, True, False]).reshape(4, 1, 1, 1)
    task, flat = reference_gradients(model, batch, 0.05, 0.001)

    metrics = run.dgq_compute_gradients(model, batch, nn.functional.cross_entropy, step=0)

    grads = {n: p.grad for n, p in model.named_parameters()}
    steps = {
        "0.act": "0.act_quantizer.step",
        "3.weight": "3.parametrizations.weight.0.step",
        "3.act": "3.act_quantizer.step",
    }
    torch.testing.assert_close(grads[steps["0.act"]], 0.5 * flat[steps["0.act"]])
    torch.testing.assert_close(grads[steps["3.act"]], 0.5 * (task[steps["3.act"]] + flat[steps["3.act"]]))
    w = steps["3.weight"]
    both, flat_only = 0.5 * (task[w] + flat[w]), 0.5 * flat[w]
    torch.testing.assert_close(
        grads[w].flatten(), torch.stack([flat_only[0], both[1], flat_only[2], both[3]]).flatten()
    )
    assert not torch.allclose(both, flat_only)  # the task gradient is not negligible here
    for name in set(grads) - set(steps.values()):  # weights, BN, head: always the full update
        torch.testing.assert_close(grads[name], 0.5 * (task[name] + flat[name]), msg=name)
    assert metrics["fqat/frozen_scales"] == 2.0 and metrics["sagm/perturbed_loss"] > metrics["loss"]


def test_freeze_both_drops_the_update_and_perturb_s_false_keeps_steps_still() -> None:
    run, model, batch = make_run(freeze_mode="freeze_s", perturb_s=False, grad_combine="sum")
    run.frozen["3.act"] = torch.ones(1, dtype=torch.bool)
    task, flat = reference_gradients(model, batch, 0.05, 0.001, move_steps=False)
    run.dgq_compute_gradients(model, batch, nn.functional.cross_entropy, step=0)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["3.act_quantizer.step"] is None
    for name in ("0.act_quantizer.step", "3.parametrizations.weight.0.step", "3.parametrizations.weight.original"):
        torch.testing.assert_close(grads[name], task[name] + flat[name])


def test_alternate_update_gives_scales_one_gradient_per_step() -> None:
    run, model, batch = make_run(update_mode="alternate")
    task, flat = reference_gradients(model, batch, 0.05, 0.001)
    name = "3.act_quantizer.step"
    for step, expected in ((0, task), (1, flat)):
        run.dgq_compute_gradients(model, batch, nn.functional.cross_entropy, step=step)
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, 0.5 * expected[name])


# -- windows and freezing decisions ---------------------------------------------------------


def feed(run: FQATRun, steps: int, pattern: dict[str, list[torch.Tensor]]) -> None:
    for t in range(steps):
        for label, seq in pattern.items():
            observe(run.windows[label], seq[t % len(seq)], None, "task")


def window_pattern(stable: str) -> dict[str, list[torch.Tensor]]:
    flip = [T([1.0]), T([-1.0])]
    same = [T([1.0])]
    channels = [T([1.0, 1.0, 1.0, 1.0]).reshape(4, 1, 1, 1), T([1.0, -1.0, -1.0, -1.0]).reshape(4, 1, 1, 1)]
    return {"0.act": same if stable == "0.act" else flip, "3.act": flip, "3.weight": channels}


@pytest.mark.parametrize("reduce", ["mean", "per_element"])
def test_window_close_freezes_low_disorder_scales_and_logs(reduce: str) -> None:
    run, _, _ = make_run(freeze_steps=4, freeze_tau=0.3, disorder_reduce=reduce)
    feed(run, 4, window_pattern(stable="0.act"))
    run.close_window(4)
    assert run.frozen["0.act"].all() and "3.act" not in run.frozen  # only real masks are kept
    weight = run.frozen.get("3.weight", torch.zeros(4, dtype=torch.bool)).flatten().tolist()
    assert weight == ([True, False, False, False] if reduce == "per_element" else [False] * 4)
    rows = {r["scale"]: r for r in run.rows}
    assert rows["0.act"]["disorder"] == 0.0 and rows["0.act"]["frozen"] is True
    assert rows["3.act"]["disorder"] == 1.0 and rows["3.act"]["frozen"] is False
    assert rows["3.weight"]["disorder"] == pytest.approx(0.75)
    assert all(w.pairs == 0 for w in run.windows.values())  # a fresh window starts
    assert run.summary()["fqat/frozen_layers"] == (2.0 if reduce == "per_element" else 1.0)


@pytest.mark.parametrize("unfreeze", [True, False])
def test_unfreeze_reselects_every_window(unfreeze: bool) -> None:
    run, _, _ = make_run(freeze_steps=4, unfreeze=unfreeze)
    feed(run, 4, window_pattern(stable="0.act"))
    run.close_window(4)
    feed(run, 4, window_pattern(stable="none"))  # now 0.act flips every step
    run.close_window(8)
    assert ("0.act" in run.frozen) is (not unfreeze)


def test_reverse_freeze_freezes_the_high_disorder_scales() -> None:
    run, _, _ = make_run(freeze_steps=4, freeze_if="above_tau")
    feed(run, 4, window_pattern(stable="0.act"))
    run.close_window(4)
    assert "0.act" not in run.frozen and run.frozen["3.act"].all()


def test_nothing_is_frozen_before_the_first_window_closes() -> None:
    run, model, batch = make_run(freeze_steps=3, freeze_tau=1.0)  # τ = 1: everything freezes once decided
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(3):
        assert not run.frozen
        run.dgq_compute_gradients(model, batch, nn.functional.cross_entropy, step=step)
        optimizer.step()
        run.dgq_after_step(model, step)
    assert set(run.frozen) == set(run.scales) and {r["step"] for r in run.rows} == {3}


def test_state_round_trips_and_follows_the_scales_device(tmp_path) -> None:
    run, _, _ = make_run(freeze_steps=4, disorder_reduce="per_element")
    feed(run, 4, window_pattern(stable="0.act"))
    run.close_window(4)
    feed(run, 3, window_pattern(stable="none"))  # a window left open mid-way
    torch.save(run.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # plain tensors and containers only

    other, model, _ = make_run(freeze_steps=4, disorder_reduce="per_element")
    other.load_state_dict(state)
    assert other.rows == run.rows and other.frozen.keys() == run.frozen.keys() == {"0.act", "3.weight"}
    assert all(torch.equal(other.frozen[k], m) for k, m in run.frozen.items())
    assert [(w.pairs, w.events.tolist()) for w in other.windows.values()] == [
        (w.pairs, w.events.tolist()) for w in run.windows.values()
    ]
    other.close_window(8)  # the open windows end alike
    run.close_window(8)
    assert [r["disorder"] for r in other.rows] == [r["disorder"] for r in run.rows]

    feed(other, 2, window_pattern(stable="none"))
    model.to("meta")  # the model moves after loading (DomainBed: load_state_dict, then .to(device))
    other.dgq_step_start(model, 10)
    assert other.frozen and {m.device.type for m in other.frozen.values()} == {"meta"}
    assert {w.events.device.type for w in other.windows.values()} == {"meta"}


# -- the plugin in wilds_run ----------------------------------------------------------------


def fqat_argv(log_dir, *extra: str) -> list[str]:
    return [
        "--plugin",
        "dg_quant.fqat",
        "--n_steps",
        "20",
        "--eval_every",
        "10",
        "--freeze_steps",
        "5",
        "--frac",
        "0.3",
        "--batch_size",
        "32",
        "--no_progress",
        "--log_dir",
        str(log_dir),
        *extra,
    ]


def test_wilds_run_with_fqat_logs_disorder_over_time(tmp_path) -> None:
    assert main(fqat_argv(tmp_path)) == 0
    rows = read_jsonl(tmp_path / "fqat_disorder.jsonl")
    scales = {r["scale"] for r in rows}
    assert {r["step"] for r in rows} == {5, 10, 15, 20}
    assert len(rows) == 4 * len(scales)
    assert "featurizer.0.act" in scales and "featurizer.0.weight" not in scales  # first conv: input only
    assert not any(s.startswith("classifier") for s in scales)  # head stays FP
    assert {r["kind"] for r in rows} == {"weight", "activation"}
    assert all(0.0 <= r["disorder"] <= 1.0 for r in rows)
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["fqat/scale_factors"] == len(scales)
    assert final["fqat/frozen_layers"] == sum(r["frozen"] for r in rows if r["step"] == 20)
    record = read_jsonl(tmp_path / "results.jsonl")[-1]
    assert "fqat/frozen_layers" in record and "train/sagm/perturbed_loss" in record
    frame = disorder_frame(tmp_path)
    assert frame.shape[0] == len(rows) and set(frame["scale"]) == scales
    png = plot_disorder(tmp_path, tau=0.3)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_disorder_frame_names_the_missing_log(tmp_path) -> None:
    with pytest.raises(DataError, match="dg_quant.fqat"):
        disorder_frame(tmp_path)


@pytest.mark.slow
def test_wilds_run_with_fqat_ewgs_hessian(tmp_path) -> None:
    argv = fqat_argv(tmp_path, "--quantizer", "ewgs", "--ewgs_hessian", "true", "--ewgs_update_every", "10")
    argv[argv.index("--n_steps") + 1] = "10"
    assert main(argv) == 0
    rows = read_jsonl(tmp_path / "fqat_disorder.jsonl")
    assert rows and all(r["ewgs_delta"] is not None and r["ewgs_delta"] >= 0 for r in rows)
    assert any(r["ewgs_delta"] > 0 for r in rows)


def test_fqat_with_ewgs_sets_the_fixed_delta_on_every_quantizer() -> None:
    _, model, _ = make_run(quantizer="ewgs", ewgs_delta=2e-3)
    deltas = [q.ewgs_delta for _, q in iter_quantizers(model)]
    assert len(deltas) == 3 and all(d == pytest.approx(2e-3 / 15) for d in deltas)
    _, plain, _ = make_run()
    assert all(q.ewgs_delta == 0.0 for _, q in iter_quantizers(plain))


class StopBefore:
    """Interrupts training as Ctrl-C would, before the given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def dgq_step_start(self, step: int) -> None:
        if step == self.step:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_resume_continues_the_same_freezing_decisions(tmp_path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(fqat_argv(straight, "--freeze_steps", "4")) == 0
    config, host = parse_config(fqat_argv(split, "--freeze_steps", "4"))
    host.register(StopBefore(13))  # killed mid-run, after the step-10 checkpoint
    with pytest.raises(KeyboardInterrupt):
        run(config, host)
    saved = torch.load(split / "last.pt", weights_only=False)["trainer"]["plugins"]["dg_quant.fqat.run"]
    assert saved["rows"] and saved["windows"]  # the state travels in last.pt, in no file of its own
    assert not (split / "fqat_state.pt").exists()
    assert main(fqat_argv(split, "--freeze_steps", "4", "--resume")) == 0
    a, b = read_jsonl(straight / "fqat_disorder.jsonl"), read_jsonl(split / "fqat_disorder.jsonl")
    assert [(r["step"], r["scale"], r["frozen"]) for r in a] == [(r["step"], r["scale"], r["frozen"]) for r in b]
    for ra, rb in zip(a, b):
        assert ra["disorder"] == pytest.approx(rb["disorder"], abs=1e-6)


def test_quantizers_of_a_fqat_model_cover_weights_and_activations() -> None:
    run, model, _ = make_run(bits=3)
    kinds = {(n, q.is_weight, q.bits) for n, q in iter_quantizers(model)}
    assert kinds == {
        ("0.act_quantizer", False, 3),
        ("3.parametrizations.weight.0", True, 3),
        ("3.act_quantizer", False, 3),
    }


def test_scale_lr_puts_the_scale_factors_in_their_own_group() -> None:
    run, model, _ = make_run(scale_lr=1e-4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    run.dgq_configure_optimizer(optimizer, model)
    steps = {id(p) for p in run.scales.values()}
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-4]
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == steps
    assert not steps & {id(p) for p in optimizer.param_groups[0]["params"]}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


@pytest.mark.slow
def test_fqat_without_freezing_is_lsq_plus_sagm(tmp_path) -> None:
    """τ = 0 freezes nothing: FQAT must then train exactly like LSQ+SAGM with FQAT's quantizers."""
    common = [
        "--n_steps",
        "20",
        "--eval_every",
        "10",
        "--frac",
        "0.3",
        "--batch_size",
        "32",
        "--bits",
        "4",
        "--no_progress",
    ]
    assert (
        main(
            [
                "--plugin",
                "dg_quant.fqat",
                "--freeze_steps",
                "5",
                "--freeze_tau",
                "0",
                *common,
                "--log_dir",
                str(tmp_path / "fqat"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "--plugin",
                "dg_quant.lsq",
                "--plugin",
                "dg_quant.sagm",
                "--act_bits",
                "4",
                "--first_layer",
                "activations_only",
                "--weight_init",
                "mse",
                "--act_init",
                "mse",
                *common,
                "--log_dir",
                str(tmp_path / "lsq_sagm"),
            ]
        )
        == 0
    )
    a, b = read_jsonl(tmp_path / "fqat" / "results.jsonl"), read_jsonl(tmp_path / "lsq_sagm" / "results.jsonl")
    assert [r["train/loss"] for r in a] == [r["train/loss"] for r in b]
    assert [r["id_val/acc_avg"] for r in a] == [r["id_val/acc_avg"] for r in b]


# -- the batched step bookkeeping equals the per-scale definition --------------------------


def _random_grads(n: int, seed: int, missing: set[int]) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 1, 1, 1), (1,), (3, 1)]
    grads = []
    for i in range(n):
        grad = torch.randn(shapes[i % 3], generator=g)
        grad[..., 0] = 0.0  # exact zeros: sign 0 must count as its own sign
        grads.append(None if i in missing else grad)
    return grads


@pytest.mark.parametrize("signal", ["task", "smooth", "task_vs_smooth"])
def test_observe_all_counts_exactly_like_observe_per_scale(signal: str) -> None:
    n = 7
    batched = [Window() for _ in range(n)]
    single = [Window() for _ in range(n)]
    for step in range(5):
        task = _random_grads(n, 2 * step, missing={1} if step < 2 else set())
        flat = _random_grads(n, 2 * step + 1, missing={4})
        observe_all(batched, task, flat, signal)
        single = [observe(w, t, f, signal) for w, t, f in zip(single, task, flat)]
    for a, b in zip(batched, single):
        assert a.pairs == b.pairs
        for x, y in ((a.events, b.events), (a.previous, b.previous)):
            assert (x is None and y is None) or torch.equal(x, y)
    assert any(w.pairs for w in batched)


@pytest.mark.parametrize(
    "update_mode, freeze_mode", [("joint", "drop_task_grad"), ("joint", "freeze_s"), ("alternate", "drop_task_grad")]
)
def test_scale_gradients_route_exactly_like_scale_gradient(update_mode: str, freeze_mode: str) -> None:
    n = 6
    task, flat = _random_grads(n, 0, missing={2}), _random_grads(n, 1, missing={3})
    frozen = [
        None,
        torch.tensor([True, False, True, False]).reshape(4, 1, 1, 1),
        None,
        torch.tensor([True]),
        torch.tensor([True, True, True, True]).reshape(4, 1, 1, 1),
        None,
    ]
    kwargs = {"weight": 0.5, "freeze_mode": freeze_mode, "update_mode": update_mode, "step": 3}
    batched = scale_gradients(task, flat, frozen, **kwargs)
    single = [scale_gradient(t, f, m, **kwargs) for t, f, m in zip(task, flat, frozen)]
    for a, b in zip(batched, single):
        assert (a is None and b is None) or torch.equal(a, b)


def test_ewgs_hessian_batches_are_cut_from_the_step_batch() -> None:
    x, y = torch.arange(40.0).reshape(40, 1), torch.arange(40)
    chunks = hessian_batches((x, y), size=16, limit=10)
    assert [c[0].shape[0] for c in chunks] == [16, 16]  # full batches only
    assert torch.equal(chunks[1][1], y[16:32])
    assert len(hessian_batches((torch.zeros(200, 1), y), size=16, limit=3)) == 3
    assert hessian_batches((x[:10], y[:10]), size=16)[0][0].shape[0] == 10  # small: the whole batch
    text = hessian_batches(({"ids": torch.zeros(32, 4), "mask": torch.ones(32, 4)}, y[:32]), size=16)
    assert len(text) == 2 and text[0][0]["mask"].shape == (16, 4)


def test_fqat_ewgs_hessian_delta_averages_several_batches() -> None:
    """δ is the mean of per-batch estimates over 16-sample batches of the step's batch (EWGS's
    several batches), not the estimate on the whole batch as one."""
    run, model, _ = make_run(quantizer="ewgs", ewgs_hessian=True, ewgs_update_every=1, ewgs_hessian_batches=3)
    gen = torch.Generator().manual_seed(2)
    batch = (torch.randn(48, 2, 6, 6, generator=gen), torch.randint(0, 3, (48,), generator=gen))
    loss_fn = nn.functional.cross_entropy
    ref = copy.deepcopy(model)
    torch.manual_seed(5)
    run.dgq_compute_gradients(model, batch, loss_fn, 0)
    torch.manual_seed(5)
    expected = hessian_deltas(ref, hessian_batches(batch, limit=3), loss_fn)
    torch.manual_seed(5)
    whole = hessian_deltas(copy.deepcopy(ref), [batch], loss_fn)
    got = {scale_label(n): q.ewgs_delta for n, q in iter_quantizers(model)}
    assert got == pytest.approx({scale_label(n): d for n, d in expected.items()})
    assert got != pytest.approx({scale_label(n): d for n, d in whole.items()})
