"""The fast paths of the LSQ kernels (half precision, channels_last, compiled) and the benchmark harness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dg_quant.quant import (
    LSQConfig,
    QuantConfig,
    default_activation_config,
    integer_bounds,
    lsq_fake_quant,
    quantize_,
)
from dg_quant.quant.api import clamp_steps_, iter_quantizers, set_compiled_kernels

ROOT = Path(__file__).resolve().parents[2]


def _fq_with_grads(x, s, qn, qp, g=0.01, upstream=None, **kw):
    x = x.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    out = lsq_fake_quant(x, s, qn, qp, g, **kw)
    out.backward(torch.ones_like(out) if upstream is None else upstream)
    return out, x.grad, s.grad


def _chain(x, s, qn, qp, g):
    """The unfused lsq-net chain (divide, clamp, round with STE, multiply) in float64."""
    x = x.detach().double().requires_grad_()
    s64 = s.detach().double().requires_grad_()
    v = torch.clamp(x / s64, -qn, qp)
    out = ((v.round() - v).detach() + v) * s64
    return x, s64, out, g


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_stays_half_and_matches_float32_maths(dtype) -> None:
    qn, qp = integer_bounds(8, signed=False)
    x32 = torch.rand(4, 6, 5, 5) * 3
    x = x32.to(dtype)
    s = torch.tensor([0.02])
    up = torch.randn(x.shape).to(dtype)
    out, gx, gs = _fq_with_grads(x, s, qn, qp, upstream=up)
    ref, rgx, rgs = _fq_with_grads(x.float(), s, qn, qp, upstream=up.float())
    assert out.dtype == dtype and gx.dtype == dtype and gs.dtype == torch.float32
    torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(gx, rgx.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(gs, rgs, rtol=1e-5, atol=1e-7)


def test_channels_last_layout_is_kept_for_outputs_and_gradients() -> None:
    qn, qp = integer_bounds(7, signed=True)
    w = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    s = torch.rand(8, 1, 1, 1) * 0.05 + 0.01
    out, gx, gs = _fq_with_grads(w, s, qn, qp)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert gx.is_contiguous(memory_format=torch.channels_last)
    assert gs.shape == s.shape
    ref, rgx, rgs = _fq_with_grads(w.contiguous(), s, qn, qp)
    assert torch.equal(out, ref) and torch.equal(gx, rgx)
    torch.testing.assert_close(gs, rgs)


@pytest.mark.parametrize("per_channel", [False, True])
def test_eager_kernel_agrees_with_float64_chain_at_the_range_edges(per_channel: bool) -> None:
    """The STE passes strictly inside (-Q_N, Q_P) (docs/methods.md 1.1); on the bounds the step gets them."""
    qn, qp = integer_bounds(4, signed=True)
    s = torch.tensor([0.25, 0.5]).reshape(2, 1) if per_channel else torch.tensor([0.25])
    edges = torch.tensor([-qn, qp, -qn - 0.5, qp + 0.5, 0.3, -1.7, 2.5, -7.49], dtype=torch.float32)
    x = (edges.unsqueeze(0) * s.reshape(-1, 1)).reshape(-1 if not per_channel else 2, edges.numel())
    x = x.reshape(1, -1) if not per_channel else x
    up = torch.randn(x.shape)
    out, gx, gs = _fq_with_grads(x, s, qn, qp, g=0.1, upstream=up)
    rx, rs, ref, g = _chain(x, s, qn, qp, 0.1)
    (ref * up.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx.double(), rx.grad, rtol=0, atol=0)
    torch.testing.assert_close(gs.double(), rs.grad * g, rtol=1e-5, atol=1e-6)
    assert gx[..., :4].eq(0).all() and torch.equal(gx[..., 4:], up[..., 4:])


def test_frozen_step_gets_no_gradient_and_input_still_does() -> None:
    qn, qp = integer_bounds(7, signed=True)
    x = torch.randn(5, 7, requires_grad=True)
    s = torch.full((5, 1), 0.05)  # a frozen step (qtdog_compat) does not require grad
    lsq_fake_quant(x, s, qn, qp).sum().backward()
    assert x.grad is not None and s.grad is None


def test_pure_bf16_step_uses_the_explicit_range_test() -> None:
    """In bf16 the value below Q_P=255 is 254 (it would round down): the kernel must not use it."""
    qn, qp = integer_bounds(8, signed=False)
    s = torch.tensor([1.0], dtype=torch.bfloat16, requires_grad=True)
    x = torch.tensor([0.0, 3.0, 254.0, 255.0, 300.0], dtype=torch.bfloat16, requires_grad=True)
    out = lsq_fake_quant(x, s, qn, qp)
    out.backward(torch.ones_like(out))
    assert out.tolist() == [0.0, 3.0, 254.0, 255.0, 255.0]
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert s.grad.item() == pytest.approx(2 * qp)  # the two clipped values; inside ones are on the grid


def test_clamp_steps_keeps_every_step_positive() -> None:
    model = quantize_(_tiny_net(), QuantConfig(activation=default_activation_config(8)))
    model(torch.randn(2, 3, 8, 8))  # initialise the activation steps
    steps = [q.step for _, q in iter_quantizers(model)]
    with torch.no_grad():
        steps[0][0] = -1.0
        steps[-1].fill_(0.0)
    clamp_steps_(model, 1e-6)
    assert all(bool((p >= 1e-6).all()) for p in steps)
    assert steps[1].min().item() > 1e-6  # untouched steps keep their values


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))


def test_set_compiled_kernels_switches_every_quantizer() -> None:
    model = quantize_(_tiny_net(), QuantConfig(activation=default_activation_config(8)))
    n = len(list(iter_quantizers(model)))
    assert n == 4  # two conv weights + two conv inputs (the head stays FP)
    assert set_compiled_kernels(model) == n and all(q.compiled for _, q in iter_quantizers(model))
    assert set_compiled_kernels(model, False) == n and not any(q.compiled for _, q in iter_quantizers(model))


@pytest.mark.slow
def test_compiled_kernels_match_eager_forward_and_input_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    from dg_quant.quant import lsq

    monkeypatch.setattr(lsq, "COMPILED_MIN_NUMEL", 0)  # the tiny net's tensors take the compiled kernels too
    torch.manual_seed(3)
    eager = quantize_(_tiny_net(), QuantConfig(weight=LSQConfig(bits=4), activation=default_activation_config(4)))
    compiled = quantize_(_tiny_net(), QuantConfig(weight=LSQConfig(bits=4), activation=default_activation_config(4)))
    compiled.load_state_dict(eager.state_dict())
    set_compiled_kernels(compiled)
    x = torch.randn(6, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    eager.to(memory_format=torch.channels_last)
    compiled.to(memory_format=torch.channels_last)
    outs = []
    for model in (eager, compiled):
        out = model(x)
        out.square().sum().backward()
        outs.append((out, {n: p.grad for n, p in model.named_parameters()}))
    assert torch.equal(outs[0][0], outs[1][0])
    for name, grad in outs[0][1].items():
        rtol = 1e-4 if name.endswith("step") else 1e-6  # step sums are reordered by the fused kernel
        torch.testing.assert_close(outs[1][1][name], grad, rtol=rtol, atol=1e-7, msg=name)


@pytest.fixture
def bench_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import bench, measure, methods

    return bench, measure, methods


def test_saved_tensor_bytes_counts_distinct_storages(bench_modules) -> None:
    _, measure, _ = bench_modules
    x = torch.randn(1000, requires_grad=True)
    with measure.saved_tensor_bytes() as total:
        y = torch.relu(x)  # saves its output: 4000 bytes
        z = y * y  # saves y twice: the same storage, not counted again
    assert total[0] == 4000
    z.sum().backward()


def test_interleaved_times_calls_every_method_equally(bench_modules) -> None:
    _, measure, _ = bench_modules
    calls = {"a": 0, "b": 0, "c": 0}

    def counter(name):
        def fn():
            calls[name] += 1

        return fn

    times = measure.interleaved_times({n: counter(n) for n in calls}, repeats=4, calls=3, device=torch.device("cpu"))
    assert calls == {"a": 12, "b": 12, "c": 12}
    assert all(len(t) == 4 and min(t) >= 0 for t in times.values())


def test_two_pass_stand_in_restores_weights_and_combines_gradients(bench_modules) -> None:
    _, _, methods = bench_modules
    from benchmarks.two_pass import TwoPassStep

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    step = TwoPassStep(rho=0.05, alpha=0.0)
    metrics = step.dgq_compute_gradients(model, (x, y), nn.functional.cross_entropy)
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-6)
    # With alpha 0 the gradient is the one at the perturbed point, which has the higher loss.
    assert metrics["perturbed_loss"] > metrics["loss"]
    assert all(p.grad is not None for p in model.parameters())


def test_bench_writes_markdown_and_json_with_side_by_side_ratios(bench_modules, tmp_path) -> None:
    bench, _, _ = bench_modules
    argv = [
        "--models",
        "digits_cnn",
        "--plugins",
        "qtdog",
        "qtdog_ref",
        "fqat",
        "--warmup",
        "1",
        "--repeats",
        "2",
        "--steps",
        "1",
        "--batch-size",
        "8",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "cpu.json").read_text())
    rows = {r["method"]: r for r in result["training"]}
    assert list(rows) == ["erm", "qtdog", "qtdog_ref", "fqat"]  # erm is added as the baseline
    assert rows["erm"]["ratio_vs_fp"] == 1.0
    assert all(r["step_ms"] > 0 and len(r["step_ms_all"]) == 2 for r in rows.values())
    # Fused layers keep FP's tensors plus the steps; the parametrized path adds every fake-quantized weight.
    assert rows["erm"]["saved_mb"] < rows["qtdog"]["saved_mb"] < 1.01 * rows["erm"]["saved_mb"]
    assert rows["qtdog_ref"]["saved_mb"] > 1.02 * rows["erm"]["saved_mb"]
    variants = [r["variant"] for r in result["inference"]]
    assert variants[0] == "fp32" and "qtdog" in variants
    qtdog_infer = next(r for r in result["inference"] if r["variant"] == "qtdog")
    assert qtdog_infer["size_mb"] < result["inference"][0]["size_mb"]
    md = (tmp_path / "cpu.md").read_text()
    assert "| digits_cnn | qtdog |" in md and result["meta"]["device"] == "cpu"
    from benchmarks import summary

    line = summary.table([tmp_path / "cpu.json"]).splitlines()[2]
    before, after = rows["qtdog_ref"]["ratio_vs_fp"], rows["qtdog"]["ratio_vs_fp"]
    best = min(rows["qtdog"]["step_ms_all"]) / min(rows["erm"]["step_ms_all"])
    assert rows["qtdog"]["ratio_best"] == pytest.approx(best)
    assert line.startswith("| digits_cnn | 64 | 8 |") and f"{before:.2f} -> {after:.2f} [{best:.2f}]" in line


def test_bench_runs_the_gpu_settings_through_the_trainer_on_cpu(bench_modules, tmp_path, monkeypatch) -> None:
    """bf16 autocast and channels_last, the CUDA defaults, reach the timed Trainer as run settings."""
    bench, _, _ = bench_modules
    built = []
    original = bench.Trainer.build.__func__
    monkeypatch.setattr(
        bench.Trainer, "build", classmethod(lambda cls, *a, **k: built.append(original(cls, *a, **k)) or built[-1])
    )
    argv = [
        "--models",
        "digits_cnn",
        "--plugins",
        "qtdog",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--steps",
        "1",
        "--batch-size",
        "8",
        "--threads",
        "1",
        "--amp",
        "bf16",
        "--channels_last",
        "--no-inference",
        "--out",
        str(tmp_path),
    ]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "cpu.json").read_text())
    assert result["meta"]["amp"] == "bf16" and result["meta"]["channels_last"] is True
    assert [r["method"] for r in result["training"]] == ["erm", "qtdog"]
    assert all(r["step_ms"] > 0 for r in result["training"])
    assert built and all(t.precision == "bf16" for t in built)
    kernels = [p for t in built for p in t.model.parameters() if p.dim() == 4]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)


@pytest.mark.slow
def test_bench_compile_times_the_module_the_trainer_steps_through(bench_modules, tmp_path, monkeypatch) -> None:
    """--compile compiles in place, as a run does: it once rebound ``trainer.model``, which the step no
    longer calls (it steps ``forward_model``), and so timed the eager model under a "compiled" label."""
    from dg_quant.quant.api import iter_quantizers

    bench, _, _ = bench_modules
    built = []
    original = bench.Trainer.build.__func__
    monkeypatch.setattr(
        bench.Trainer, "build", classmethod(lambda cls, *a, **k: built.append(original(cls, *a, **k)) or built[-1])
    )
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    argv = ["--models", "digits_cnn", "--plugins", "qtdog", "--warmup", "1", "--repeats", "1", "--steps", "1"]
    argv += ["--batch-size", "8", "--threads", "1", "--compile", "--no-inference", "--no-ops", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    assert len(built) == 2 and all(t.forward_model is t.model for t in built)
    assert all(t.forward_model._compiled_call_impl is not None for t in built)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # both models' forwards were traced
    # Under a whole-model compile the quantizers keep the eager kernels (dynamo fuses them), as in a run.
    quantizers = [q for t in built for _, q in iter_quantizers(t.model)]
    assert quantizers and not any(q.compiled for q in quantizers)


def test_bench_reports_bad_input_in_one_line(bench_modules, capsys) -> None:
    bench, _, _ = bench_modules
    assert bench.main(["--models", "nope", "--plugins", "erm"]) == 2
    assert "bench: error: unknown benchmark model 'nope'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench.main(["--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.slow
def test_kernel_benchmark_prints_one_row_per_model(bench_modules, capsys) -> None:
    from benchmarks import kernels

    assert kernels.main(["--models", "digits_cnn", "--repeats", "1", "--threads", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| digits_cnn")]
    assert len(rows) == 1 and rows[0].count("x |") == 2


def test_kernel_benchmark_reference_chain_computes_the_same_quantizer(bench_modules) -> None:
    from benchmarks import kernels

    w = torch.randn(16, 8, 3, 3) * 0.1
    s = torch.rand(16, 1, 1, 1) * 0.01 + 0.002
    up = torch.randn(w.shape)
    x1, s1 = w.clone().requires_grad_(), s.clone().requires_grad_()
    (kernels.lsqnet_chain(x1, s1, 0.01) * up).sum().backward()
    out, gx, gs = _fq_with_grads(w, s, kernels.QN, kernels.QP, g=0.01, upstream=up)
    torch.testing.assert_close(out, kernels.lsqnet_chain(w, s, 0.01), rtol=0, atol=1e-6)
    torch.testing.assert_close(gx, x1.grad)
    torch.testing.assert_close(gs, s1.grad, rtol=1e-4, atol=1e-6)
