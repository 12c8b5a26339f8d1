"""LSQ maths against a float64 autograd reference (docs/methods.md section 1)."""

from __future__ import annotations

import math

import pytest
import torch

from dg_quant.errors import ConfigError
from dg_quant.quant import LSQConfig, LSQQuantizer, integer_bounds, lsq_fake_quant
from dg_quant.quant.init import lsq_step, mse_step


def reference_lsq(x: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float) -> torch.Tensor:
    """lsq-net's order: grad-scale trick on s, divide, clamp, round with STE, multiply."""
    s_scaled = (s - s * g).detach() + s * g
    v = torch.clamp(x / s_scaled, -qn, qp)
    v = (v.round() - v).detach() + v
    return v * s_scaled


@pytest.mark.parametrize("bits", [2, 4, 7, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_forward_and_gradients_match_float64_reference(bits: int, per_channel: bool) -> None:
    torch.manual_seed(bits)
    qn, qp = integer_bounds(bits, signed=True)
    x = torch.randn(6, 5, 3, 3, dtype=torch.float64) * 0.3
    shape = (6, 1, 1, 1) if per_channel else (1,)
    s = torch.rand(shape, dtype=torch.float64) * 0.05 + 0.02
    g = 1 / math.sqrt(qp * x.numel())
    upstream = torch.randn_like(x)

    x1, s1 = x.clone().requires_grad_(), s.clone().requires_grad_()
    out = lsq_fake_quant(x1, s1, qn, qp, g)
    (out * upstream).sum().backward()
    x2, s2 = x.clone().requires_grad_(), s.clone().requires_grad_()
    ref = reference_lsq(x2, s2, qn, qp, g)
    (ref * upstream).sum().backward()

    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-10, atol=1e-12)


def test_values_are_integer_multiples_of_the_step_within_bounds() -> None:
    qn, qp = integer_bounds(3, signed=True)
    x = torch.linspace(-2, 2, 101)
    s = torch.tensor([0.1])
    codes = lsq_fake_quant(x, s, qn, qp) / s
    torch.testing.assert_close(codes, codes.round())
    assert codes.min().item() == -qn and codes.max().item() == qp


def test_step_gradient_per_element_rule() -> None:
    """d(xhat)/ds = round(v) - v inside the range, -Q_N below, Q_P above (v = x/s)."""
    qn, qp = integer_bounds(4, signed=True)
    s = torch.tensor([0.5], requires_grad=True)
    x = torch.tensor([-10.0, -0.6, 0.2, 0.74, 10.0])
    out = lsq_fake_quant(x, s, qn, qp, grad_scale=1.0)
    grads = [torch.autograd.grad(out[i], s, retain_graph=True)[0].item() for i in range(len(x))]
    v = (x / 0.5).tolist()
    expected = [-qn, round(v[1]) - v[1], round(v[2]) - v[2], round(v[3]) - v[3], qp]
    assert grads == pytest.approx(expected, abs=1e-6)


def test_straight_through_gradient_is_zero_outside_the_range() -> None:
    qn, qp = integer_bounds(2, signed=False)
    x = torch.tensor([-1.0, 0.5, 1.0, 100.0], requires_grad=True)
    lsq_fake_quant(x, torch.tensor([0.5]), qn, qp).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("bounds", [(8, 7), (0, 15), (128, 127)])
def test_range_mask_equals_where_on_the_strict_range(bounds) -> None:
    """The fast mask (aten's hardtanh_backward) passes exactly where -Q_N < v < Q_P, bounds and signed zeros
    included, in float32 and bfloat16, and in place."""
    from dg_quant.quant.lsq import _inside_only

    qn, qp = bounds
    for dtype, bits in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16)):
        edges = torch.tensor([-qn, qp, 0.0, -0.0, -qn - 0.5, qp + 0.5, -qn + 0.01, qp - 0.01])
        v = torch.cat([edges, torch.randn(1000) * qp]).to(dtype)
        t = torch.randn(v.shape).to(dtype)
        expected = torch.where((v > -qn) & (v < qp), t, 0.0).view(bits)
        assert torch.equal(_inside_only(t, v, qn, qp).view(bits), expected)
        in_place = v.clone()
        _inside_only(in_place, in_place, qn, qp, out=in_place)
        assert torch.equal(in_place.view(bits), torch.where((v > -qn) & (v < qp), v, 0.0).view(bits))


def test_bounds_per_mode() -> None:
    assert integer_bounds(7, signed=True) == (64, 63)
    assert integer_bounds(7, signed=True, symmetric=True) == (63, 63)
    assert integer_bounds(7, signed=False) == (0, 127)


@pytest.mark.parametrize(
    ("variant", "count"),
    [("tensor", lambda w: w.numel()), ("per_channel", lambda w: w.numel() // w.shape[0]), ("none", None)],
)
def test_gradient_scale_variants(variant: str, count) -> None:
    w = torch.randn(8, 4, 3, 3)
    q = LSQQuantizer(LSQConfig(bits=7, grad_scale=variant), (8, 1, 1, 1), is_weight=True)
    expected = 1.0 if count is None else 1 / math.sqrt(63 * count(w))
    assert q.grad_scale(w) == pytest.approx(expected)


def test_activation_per_channel_scale_uses_features_per_sample() -> None:
    x = torch.rand(16, 10)
    q = LSQQuantizer(
        LSQConfig(bits=8, mode="unsigned", granularity="per_tensor", grad_scale="per_channel"), is_weight=False
    )
    assert q.grad_scale(x) == pytest.approx(1 / math.sqrt(255 * 10))


def test_lsq_init_is_two_mean_abs_over_sqrt_qp() -> None:
    w = torch.randn(5, 7)
    torch.testing.assert_close(lsq_step(w, 63, per_channel=True), 2 * w.abs().mean(dim=1) / math.sqrt(63))
    torch.testing.assert_close(lsq_step(w, 63, per_channel=False), (2 * w.abs().mean() / math.sqrt(63)).reshape(1))


def test_mse_init_beats_lsq_init_and_max_range() -> None:
    torch.manual_seed(1)
    w = torch.randn(4, 512)
    w[0, 0] = 12.0  # an outlier makes the min-max range wasteful
    qn, qp = integer_bounds(4, signed=True)

    def err(step: torch.Tensor) -> torch.Tensor:
        st = step.reshape(-1, 1)
        return ((torch.clamp(w / st, -qn, qp).round() * st - w) ** 2).sum(dim=1)

    mse = err(mse_step(w, qn, qp, per_channel=True))
    assert torch.all(mse <= err(lsq_step(w, qp, per_channel=True)) + 1e-6)
    assert torch.all(mse <= err(w.abs().amax(dim=1) / qp) + 1e-6)


def test_auto_mode_picks_sign_from_data() -> None:
    q = LSQQuantizer(LSQConfig(bits=8, mode="auto", granularity="per_tensor"), is_weight=False)
    q(torch.rand(4, 3))
    assert q.signed is False and q.bounds == (0, 255)
    q2 = LSQQuantizer(LSQConfig(bits=8, mode="auto", granularity="per_tensor"), is_weight=False)
    q2(torch.randn(4, 3))
    assert q2.signed is True and q2.bounds == (128, 127)


def test_disabled_quantizer_is_identity() -> None:
    q = LSQQuantizer(LSQConfig(bits=2), (3, 1), is_weight=True)
    q.enabled = False
    x = torch.randn(3, 4)
    assert torch.equal(q(x), x)


def test_ewgs_delta_scales_the_straight_through_gradient() -> None:
    qn, qp = integer_bounds(4, signed=True)
    s = torch.tensor([1.0])
    x = torch.tensor([0.3, -0.3], requires_grad=True)
    upstream = torch.tensor([1.0, 1.0])
    (lsq_fake_quant(x, s, qn, qp, ewgs_delta=0.5) * upstream).sum().backward()
    # g * (1 + delta * sign(g) * (v - round(v)))
    assert x.grad.tolist() == pytest.approx([1 + 0.5 * 0.3, 1 - 0.5 * 0.3])


@pytest.mark.parametrize("bits", [1, 9, 0, 3.5])
def test_bits_out_of_range_is_a_clear_error(bits) -> None:
    with pytest.raises(ConfigError, match="bits must be an integer from 2 to 8"):
        LSQConfig(bits=bits)


def test_extra_state_round_trips_through_state_dict() -> None:
    q = LSQQuantizer(LSQConfig(bits=8, mode="auto", granularity="per_tensor"), is_weight=False)
    q(torch.randn(10))
    q2 = LSQQuantizer(LSQConfig(bits=8, mode="auto", granularity="per_tensor"), is_weight=False)
    q2.load_state_dict(q.state_dict())
    assert (q2.initialized, q2.signed, q2.enabled) == (True, q.signed, True)
    assert torch.equal(q2.step, q.step)
