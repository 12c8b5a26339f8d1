"""INQ, Incremental Network Quantization (Zhou et al., ICLR 2017; docs/methods.md section 4).

Weights move, partition by partition, onto power-of-two levels {0, ±2^n2, ..., ±2^n1}; once a
weight is quantized it is frozen and the remaining free weights retrain to compensate. This module
holds the maths (levels, projection, which weights a partition freezes, the sign + exponent codes
the exporter stores); the training-loop side (schedule over steps, masked updates) is the
``dg_quant.inq`` plugin.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dg_quant.errors import ConfigError

DEFAULT_PARTITIONS = (0.5, 0.75, 0.875, 1.0)
STRATEGIES = ("magnitude", "random")
# Buffer names of the per-tensor INQ state; the plugin registers them, the exporter and the
# compression report read them (the core never imports the plugin).
FROZEN_BUFFER = "inq_frozen"
EXPONENTS_BUFFER = "inq_exponents"
APPLIED_BUFFER = "inq_partitions_applied"
INQ_BUFFERS = (FROZEN_BUFFER, EXPONENTS_BUFFER, APPLIED_BUFFER)
_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def inq_exponents(weight: torch.Tensor, bits: int) -> tuple[int, int]:
    """(n1, n2) of the paper: n1 = floor(log2(4s/3)) with s = max|W|, n2 = n1 + 1 - 2^(b-1)/2.

    That gives 2^(b-1) + 1 levels (b = 5: 17). The quantlab copy shipped with QT-DoG uses
    n1 + 2 - L/2, which loses two levels; we follow the paper.
    """
    if bits < 2:
        raise ConfigError(f"INQ needs at least 2 bits (one sign bit and one exponent); got {bits}")
    s = float(weight.detach().abs().max())
    if s == 0.0:
        return 0, 1 - 2 ** (bits - 2)
    n1 = math.floor(math.log2(4.0 * s / 3.0))
    return n1, n1 + 1 - 2 ** (bits - 1) // 2


def inq_levels(n1: int, n2: int) -> torch.Tensor:
    """All levels, ascending: the negative powers of two, 0, the positive powers of two."""
    powers = [2.0**n for n in range(n2, n1 + 1)]
    return torch.tensor(sorted([-p for p in powers] + [0.0] + powers), dtype=torch.float64)


def inq_project(weight: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
    """Map every weight to its level: |w| in [3/4 * 2^n, 3/2 * 2^n) -> 2^n, |w| < 2^(n2-1) -> 0.

    For the smallest level the lower edge is (0 + 2^n2)/2 = 2^(n2-1); magnitudes above the top
    interval (possible only after retraining grows a weight) clip to 2^n1 instead of 0.
    """
    w = weight.detach()
    mag = w.abs().double()
    exponent = torch.floor(torch.log2(mag.clamp_min(1e-300) * 4.0 / 3.0)).clamp(n2, n1)
    level = torch.exp2(exponent)
    level = torch.where(mag < 2.0 ** (n2 - 1), torch.zeros_like(level), level)
    return (torch.sign(w).double() * level).to(w.dtype)


def next_frozen_mask(
    weight: torch.Tensor,
    frozen: torch.Tensor,
    fraction: float,
    strategy: str = "magnitude",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The frozen mask after the partition whose cumulative quantized fraction is ``fraction``.

    ``magnitude`` freezes the largest free magnitudes first (current weights); ``random`` draws
    the free weights to freeze uniformly. Already frozen weights stay frozen; the count is exact.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"INQ strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    flat_frozen = frozen.reshape(-1).bool()
    target = min(round(fraction * flat_frozen.numel()), flat_frozen.numel())
    extra = target - int(flat_frozen.sum())
    if extra <= 0:
        return frozen.bool().clone()
    if strategy == "magnitude":
        score = weight.detach().abs().reshape(-1).double()
    else:
        score = torch.rand(flat_frozen.numel(), generator=generator, dtype=torch.float64).to(weight.device)
    score = score.masked_fill(flat_frozen, -1.0)
    chosen = torch.topk(score, extra).indices
    out = flat_frozen.clone()
    out[chosen] = True
    return out.reshape(frozen.shape)


def parse_partitions(spec: str | Sequence[float]) -> tuple[float, ...]:
    """Validate cumulative fractions: increasing, in (0, 1], ending at 1 (``"0.5,0.75,1"`` works)."""
    try:
        values = tuple(float(v) for v in (spec.split(",") if isinstance(spec, str) else spec))
    except ValueError:
        raise ConfigError(
            f"INQ partitions must be comma-separated numbers like 0.5,0.75,0.875,1; got {spec!r}"
        ) from None
    if not values or any(not 0 < v <= 1 for v in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise ConfigError(f"INQ partitions must increase within (0, 1]; got {spec!r}")
    if values[-1] != 1.0:
        raise ConfigError(f"the last INQ partition must be 1.0 so that every weight ends quantized; got {spec!r}")
    return values


@dataclass(frozen=True)
class PartitionSchedule:
    """Step at which each partition is applied: evenly spread over [start, total)."""

    fractions: tuple[float, ...]
    start: int
    total: int

    def steps(self) -> list[int]:
        span = max(self.total - self.start, 0)
        return [self.start + (k * span) // len(self.fractions) for k in range(len(self.fractions))]

    def partitions_due(self, step: int) -> int:
        """How many partitions must have been applied before ``step`` runs."""
        return sum(1 for s in self.steps() if s <= step)


# -- storage: sign + exponent codes ---------------------------------------------------------


@dataclass(frozen=True)
class InqLayer:
    """The INQ state of one weight tensor as training left it."""

    name: str
    module: nn.Module
    n1: int
    n2: int
    partitions_applied: int
    frozen: torch.Tensor

    @property
    def bits(self) -> int:
        return inq_code_bits(self.n1, self.n2)


def iter_inq_layers(model: nn.Module) -> Iterator[InqLayer]:
    """Every module holding INQ buffers (``dg_quant.inq``), started or not."""
    for name, module in model.named_modules():
        if all(hasattr(module, b) for b in INQ_BUFFERS):
            n1, n2 = (int(v) for v in getattr(module, EXPONENTS_BUFFER))
            yield InqLayer(name, module, n1, n2, int(getattr(module, APPLIED_BUFFER)), getattr(module, FROZEN_BUFFER))


def inq_code_bits(n1: int, n2: int) -> int:
    """Bits per stored weight: one sign bit plus an exponent slot (0 = zero, 1.. = 2^n2..2^n1).

    With the paper's n2 this is the INQ bit width b: 2^(b-2) magnitudes need b-1 bits next to the
    zero slot (2^(b-1)+1 levels in b bits, as in the paper; the spare code holds -0.0).
    """
    slots = n1 - n2 + 2  # zero + one slot per magnitude
    return 1 + max(1, math.ceil(math.log2(slots)))


def inq_encode(weight: torch.Tensor, n1: int, n2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, exact): b-bit codes ``sign << (b-1) | slot`` and where decoding gives the same bits.

    Weights off the levels (free weights of an unfinished partition, NaN, grown past 2^n1) are
    not exact; their codes are 0 and the caller must store them some other way.
    """
    bits = inq_code_bits(n1, n2)
    w = weight.detach()
    mantissa, exponent = torch.frexp(w.double().abs())  # |w| = m * 2^e, m in [0.5, 1)
    power = exponent.long() - 1
    on_grid = (mantissa == 0.5) & (power >= n2) & (power <= n1)
    slot = torch.where(on_grid, power - n2 + 1, torch.zeros_like(power))
    codes = (torch.signbit(w).long() << (bits - 1)) | slot
    exact = _same_bits(inq_decode(codes, n1, n2, w.dtype), w)
    return torch.where(exact, codes, torch.zeros_like(codes)).to(torch.uint8), exact


def inq_decode(codes: torch.Tensor, n1: int, n2: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``inq_encode``: ±2^(n2 + slot - 1), ±0 for slot 0 (the sign of zero kept)."""
    bits = inq_code_bits(n1, n2)
    codes = codes.long()
    slot = codes & ((1 << (bits - 1)) - 1)
    powers = torch.exp2((slot + n2 - 1).double())
    magnitude = torch.where(slot > 0, powers, torch.zeros_like(powers))
    return torch.where((codes >> (bits - 1)).bool(), -magnitude, magnitude).to(dtype)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    view = _INT_VIEW[a.element_size()]
    return a.contiguous().view(view) == b.contiguous().view(view)
