"""MSE step initialisation (docs/methods.md 2) against a brute-force search written here."""

from __future__ import annotations

import pytest
import torch

from dg_quant.quant import integer_bounds
from dg_quant.quant.init import lsq_step, mse_step


def squared_error(rows: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    s = step.reshape(-1, 1)
    return ((torch.clamp(rows / s, -qn, qp).round() * s - rows) ** 2).sum(dim=1)


def brute_force_error(rows: torch.Tensor, qn: int, qp: int, points: int = 5000) -> torch.Tensor:
    """The smallest error over ``points`` evenly spaced steps in (0, max|x|/Q_P], per row."""
    top = rows.abs().amax(dim=1, keepdim=True)
    best = torch.full((rows.shape[0],), float("inf"), dtype=rows.dtype)
    fractions = torch.arange(1, points + 1, dtype=rows.dtype) / points
    chunk = max(1, (1 << 22) // rows.numel())
    for part in fractions.split(chunk):
        steps = (top * part / qp).unsqueeze(2)  # [R, P, 1]
        x = rows.unsqueeze(1)
        err = ((torch.clamp(x / steps, -qn, qp).round() * steps - x) ** 2).sum(dim=2)
        best = torch.minimum(best, err.amin(dim=1))
    return best


def rows_of(kind: str) -> torch.Tensor:
    """Realistic weight rows: 3x3 depthwise (9 values), dense conv rows, heavy-tailed rows."""
    g = torch.Generator().manual_seed(0)
    if kind == "depthwise_gauss":
        return torch.randn(60, 9, generator=g, dtype=torch.float64)
    if kind == "depthwise_laplace":
        u = torch.rand(60, 9, generator=g, dtype=torch.float64) - 0.5
        return -u.sign() * torch.log1p(-2 * u.abs())
    if kind == "dense_gauss":
        return torch.randn(12, 576, generator=g, dtype=torch.float64)
    t = torch.randn(8, 1152, generator=g, dtype=torch.float64)
    return t / (torch.rand(8, 1152, generator=g, dtype=torch.float64).clamp_min(0.05) ** 0.5)  # heavy tails


@pytest.mark.parametrize("bits", [4, 7])
@pytest.mark.parametrize("kind", ["depthwise_gauss", "depthwise_laplace", "dense_gauss", "heavy_tails"])
def test_mse_step_is_as_good_as_a_brute_force_search(bits: int, kind: str) -> None:
    rows = rows_of(kind)
    qn, qp = integer_bounds(bits, signed=True)
    found = squared_error(rows, mse_step(rows, qn, qp, per_channel=True), qn, qp)
    best = brute_force_error(rows, qn, qp)
    ratio = found / best
    assert float(ratio.max()) <= 1.002, (kind, bits, float(ratio.max()))


def test_mse_step_beats_lsq_and_min_max_on_every_row() -> None:
    rows = rows_of("heavy_tails").float()
    qn, qp = integer_bounds(7, signed=True)
    found = squared_error(rows, mse_step(rows, qn, qp, per_channel=True), qn, qp)
    assert torch.all(found <= squared_error(rows, lsq_step(rows, qp, per_channel=True), qn, qp))
    assert torch.all(found <= squared_error(rows, rows.abs().amax(dim=1) / qp, qn, qp))


def test_mse_step_per_tensor_and_unsigned() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, 5, 5, generator=g, dtype=torch.float64).relu()  # post-ReLU activations
    qn, qp = integer_bounds(4, signed=False)
    step = mse_step(x, qn, qp, per_channel=False)
    assert step.shape == (1,)
    rows = x.reshape(1, -1)
    assert float(squared_error(rows, step, qn, qp) / brute_force_error(rows, qn, qp)) <= 1.002


def test_mse_step_is_float32_for_any_input() -> None:
    """Solvers (GPTQ/OBC) compute in float64 but the quantizer stores a float32 step: a float32
    search result survives the copy exactly, so solved weights stay on the stored grid."""
    w = torch.randn(6, 27, dtype=torch.float64)
    assert mse_step(w, 64, 63, per_channel=True).dtype == torch.float32
