"""EWGS δ (docs/methods.md 3): the unit mapping, the fixed setting and the Hessian-trace estimate."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dg_quant.quant import (
    LSQConfig,
    LSQQuantizer,
    QuantConfig,
    default_activation_config,
    integer_bounds,
    iter_quantizers,
    lsq_fake_quant,
    quantize_,
)
from dg_quant.quant.ewgs import (
    hessian_deltas,
    hutchinson_trace,
    integer_delta,
    set_fixed_delta_,
    set_hessian_delta_,
)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_fused_backward_with_integer_delta_is_ewgs_on_normalised_inputs(bits: int) -> None:
    """EWGS's rule g·(1 + δ·sign(g)·(x_n − x_q)) on x_n in [0, 1] equals the fused backward with δ/(L−1)."""
    torch.manual_seed(bits)
    qn, qp = integer_bounds(bits, signed=True)
    s, delta = torch.tensor([0.05]), 0.3
    x = (torch.rand(200) * 2 - 1) * 0.05 * qp  # inside the range
    upstream = torch.randn(200)
    x_req = x.clone().requires_grad_()
    q = LSQQuantizer(LSQConfig(bits=bits, granularity="per_tensor"), is_weight=True)
    lsq_fake_quant(x_req, s, qn, qp, 1.0, integer_delta(delta, q)).mul(upstream).sum().backward()

    levels = qn + qp + 1
    x_n = (x / s + qn) / (levels - 1)  # the same grid, normalised to [0, 1]
    x_q = torch.round(x_n * (levels - 1)) / (levels - 1)
    expected = upstream * (1 + delta * torch.sign(upstream) * (x_n - x_q))
    torch.testing.assert_close(x_req.grad, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(x_req.grad, upstream)  # δ does change the gradient


class _EWGSRound(torch.autograd.Function):
    """The EWGS discretiser as the paper's code writes it: round on [0, 1], scaled gradient back."""

    @staticmethod
    def forward(ctx, x_n, levels, delta):  # type: ignore[override]
        x_q = torch.round(x_n * (levels - 1)) / (levels - 1)
        ctx.save_for_backward(x_n - x_q)
        ctx.delta = delta
        return x_q

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (diff,) = ctx.saved_tensors
        return g * (1 + ctx.delta * torch.sign(g) * diff), None, None


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_ewgs_step_gradient_is_the_chain_rule_through_the_scaled_rounding(bits: int) -> None:
    """Autograd through EWGS's discretiser on x_n = (clip(x/s) + Q_N)/(L − 1) gives the step its
    gradient too (as EWGS's interval bounds get theirs); the fused backward must match it for x and s."""
    torch.manual_seed(bits)
    qn, qp = integer_bounds(bits, signed=True)
    levels, delta = qn + qp + 1, 0.4
    x = torch.randn(300, dtype=torch.float64) * 0.05 * qp / 2  # mostly inside, some clipped
    upstream = torch.randn(300, dtype=torch.float64)

    s_ref = torch.tensor([0.05], dtype=torch.float64, requires_grad=True)
    x_ref = x.clone().requires_grad_()
    x_n = (torch.clamp(x_ref / s_ref, -qn, qp) + qn) / (levels - 1)
    out = (_EWGSRound.apply(x_n, levels, delta) * (levels - 1) - qn) * s_ref
    out.mul(upstream).sum().backward()

    s = torch.tensor([0.05], dtype=torch.float64, requires_grad=True)
    x_req = x.clone().requires_grad_()
    lsq_fake_quant(x_req, s, qn, qp, 1.0, delta / (levels - 1)).mul(upstream).sum().backward()
    torch.testing.assert_close(x_req.grad, x_ref.grad)
    torch.testing.assert_close(s.grad, s_ref.grad)
    s_ste = torch.tensor([0.05], dtype=torch.float64, requires_grad=True)
    lsq_fake_quant(x.clone().requires_grad_(), s_ste, qn, qp, 1.0, 0.0).mul(upstream).sum().backward()
    assert not torch.allclose(s_ste.grad, s.grad)  # δ reaches the step gradient


def test_ewgs_step_gradient_keeps_lsq_gradient_scale() -> None:
    """The LSQ step-gradient scale g multiplies the EWGS step gradient like the STE one."""
    torch.manual_seed(0)
    x, upstream = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    grads = []
    for scale in (1.0, 0.125):
        s = torch.tensor([0.1], dtype=torch.float64, requires_grad=True)
        lsq_fake_quant(x, s, 8, 7, scale, 0.01).mul(upstream).sum().backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[1], grads[0] * 0.125)


def quantized_net(act_bits: int = 4) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    return quantize_(
        net,
        QuantConfig(
            weight=LSQConfig(bits=4), activation=default_activation_config(act_bits), first_layer="activations_only"
        ),
    )


def test_fixed_delta_reaches_every_quantizer_in_integer_units() -> None:
    net = quantized_net(act_bits=3)
    assert set_fixed_delta_(net, 1e-3, act_delta=2e-3) == 3  # conv1 input, conv2 weight and input
    for _, q in iter_quantizers(net):
        paper = 1e-3 if q.is_weight else 2e-3
        assert q.ewgs_delta == pytest.approx(paper / (2**q.bits - 1))


def test_hutchinson_is_exact_for_a_diagonal_hessian_and_close_otherwise() -> None:
    y = torch.randn(30, requires_grad=True)
    diag = torch.rand(30) + 0.5
    (g,) = torch.autograd.grad(0.5 * (diag * y**2).sum(), y, create_graph=True)
    scale = torch.full((30,), 2.0)
    (trace,) = hutchinson_trace([y], [g], [scale], max_iter=3)
    torch.testing.assert_close(trace, (diag * 4).sum())

    a = torch.randn(30, 30)
    h = a @ a.T / 30 + torch.eye(30)
    (g,) = torch.autograd.grad(0.5 * y @ h @ y, y, create_graph=True)
    (trace,) = hutchinson_trace([y], [g], [torch.ones(30)], max_iter=400, tol=0.0)
    assert trace.item() == pytest.approx(torch.trace(h).item(), rel=0.1)


def test_hessian_delta_matches_the_closed_form_on_a_quadratic() -> None:
    """loss = ½‖X Ŵᵀ‖² with XᵀX diagonal: Tr(H) = out·‖X‖², g = Ŵ XᵀX, in integer units via s."""
    torch.manual_seed(3)
    lin = nn.Linear(3, 2, bias=False)
    quantize_(lin, QuantConfig(weight=LSQConfig(bits=4, granularity="per_tensor"), quantize_head=True))
    x = torch.diag(torch.tensor([2.0, 1.0, 3.0]))
    loss_fn = lambda out, _y: 0.5 * (out**2).sum()  # noqa: E731
    deltas = hessian_deltas(lin, [(x, None)], loss_fn)
    ((name, q),) = list(iter_quantizers(lin))
    s = q.step.detach()
    w_hat = lin.weight.detach()
    g = w_hat @ (x.T @ x)
    expected = s**2 * (2 * (x**2).sum() / w_hat.numel()) / (3 * (g * s).std())
    assert deltas[name] == pytest.approx(float(expected), rel=1e-4)


def test_hessian_estimate_leaves_the_model_as_it_was() -> None:
    net = quantized_net()
    x, y = torch.randn(6, 2, 5, 5), torch.randint(0, 3, (6,))
    net(x)  # initialise the activation steps
    set_fixed_delta_(net, 1e-3)
    state = copy.deepcopy(net.state_dict())
    deltas = set_hessian_delta_(net, [(x, y), (x * 0.5, y)], nn.functional.cross_entropy, max_iter=10)
    assert len(deltas) == 3 and all(d >= 0 and d == d for d in deltas.values())
    assert any(d > 0 for d in deltas.values())
    for name, q in iter_quantizers(net):
        assert q.ewgs_delta == deltas[name]
    for key, value in state.items():
        now = net.state_dict()[key]
        assert torch.equal(now, value) if isinstance(value, torch.Tensor) else now == value, key
    assert all(p.grad is None for p in net.parameters())
