"""INQ maths: paper levels, projection intervals, partition masks, schedule."""

from __future__ import annotations

import pytest
import torch

from dg_quant.errors import ConfigError
from dg_quant.quant.inq import (
    INQ_BUFFERS,
    PartitionSchedule,
    inq_code_bits,
    inq_decode,
    inq_encode,
    inq_exponents,
    inq_levels,
    inq_project,
    iter_inq_layers,
    next_frozen_mask,
    parse_partitions,
)


@pytest.mark.parametrize("bits", [3, 5, 7])
def test_paper_level_count_not_the_quantlab_off_by_one(bits):
    w = torch.randn(64, 32)
    n1, n2 = inq_exponents(w, bits)
    levels = inq_levels(n1, n2)
    assert len(levels) == 2 ** (bits - 1) + 1  # b = 5: 17; quantlab's n1 + 2 - L/2 would give 15
    assert n2 == n1 + 1 - 2 ** (bits - 2)
    s = float(w.abs().max())
    assert 2.0**n1 <= 4 * s / 3 < 2.0 ** (n1 + 1)


def test_projection_lands_on_levels_with_paper_intervals():
    n1, n2 = 0, -3  # levels 0, ±1/8, ±1/4, ±1/2, ±1
    w = torch.tensor([0.0, 0.06, 0.0626, 0.18, 0.19, 0.374, 0.376, 1.2, 1.6, -0.3, -0.05])
    q = inq_project(w, n1, n2)
    expected = torch.tensor([0.0, 0.0, 0.125, 0.125, 0.25, 0.25, 0.5, 1.0, 1.0, -0.25, 0.0])
    assert torch.equal(q, expected)
    levels = set(inq_levels(n1, n2).tolist())
    rand = inq_project(torch.randn(1000), n1, n2)
    assert set(rand.tolist()) <= levels
    assert torch.equal(inq_project(q, n1, n2), q)  # idempotent


def test_projection_is_nearest_level_for_levels_above_the_smallest():
    w = torch.rand(5000) * 1.4 + 0.07  # inside [2^(n2-1), 1.5 * 2^n1) for n1=0, n2=-3
    q = inq_project(w, 0, -3)
    levels = inq_levels(0, -3).float()
    # Paper intervals [3b/4, 3b/2) split geometric neighbours at their arithmetic mean: nearest level.
    nearest = levels[(w[:, None] - levels[None]).abs().argmin(dim=1)]
    assert torch.equal(q, nearest)


def test_magnitude_partitions_freeze_largest_first_with_exact_counts():
    w = torch.randn(40, 25)
    frozen = torch.zeros_like(w, dtype=torch.bool)
    previous = frozen
    for fraction in parse_partitions("0.5,0.75,0.875,1"):
        frozen = next_frozen_mask(w, previous, fraction)
        assert int(frozen.sum()) == round(fraction * w.numel())
        assert bool((frozen | ~previous).all())  # never unfreezes
        if not frozen.all():
            assert w[frozen].abs().min() >= w[~frozen].abs().max()
        previous = frozen


def test_random_strategy_keeps_counts_and_earlier_partitions():
    w = torch.randn(100)
    g = torch.Generator().manual_seed(1)
    first = next_frozen_mask(w, torch.zeros(100, dtype=torch.bool), 0.5, "random", g)
    second = next_frozen_mask(w, first, 0.75, "random", g)
    assert int(first.sum()) == 50 and int(second.sum()) == 75
    assert bool(second[first].all())
    assert not torch.equal(first, w.abs() >= w.abs().median())  # not the magnitude order


@pytest.mark.parametrize("bad", ["0.5,0.4,1", "0.5,0.75", "0,1", "a,b", ""])
def test_bad_partitions_are_one_line_errors(bad):
    with pytest.raises(ConfigError):
        parse_partitions(bad)


def test_schedule_spreads_partitions_over_the_run():
    schedule = PartitionSchedule((0.5, 0.75, 0.875, 1.0), start=10, total=50)
    assert schedule.steps() == [10, 20, 30, 40]
    assert [schedule.partitions_due(s) for s in (0, 9, 10, 19, 20, 45)] == [0, 0, 1, 1, 2, 4]


@pytest.mark.parametrize("bits", [2, 3, 5, 7, 8])
def test_codes_are_b_bits_and_decode_every_level_bit_exactly(bits):
    w = torch.randn(300, 7)
    n1, n2 = inq_exponents(w, bits)
    assert inq_code_bits(n1, n2) == bits  # 2^(b-1)+1 levels (and -0.0) fit the paper's b bits
    levels = inq_levels(n1, n2).float()
    on_levels = torch.cat([levels, torch.tensor([-0.0]), inq_project(w, n1, n2).reshape(-1)])
    codes, exact = inq_encode(on_levels, n1, n2)
    assert bool(exact.all()) and int(codes.max()) < 2**bits
    decoded = inq_decode(codes, n1, n2)
    assert torch.equal(decoded.view(torch.int32), on_levels.view(torch.int32))  # sign of zero kept
    assert len(set(codes.tolist())) == len(levels) + 1  # one code per level, plus -0.0


def test_weights_off_the_levels_are_flagged_not_rounded():
    n1, n2 = 0, -3  # levels 0, ±1/8 .. ±1
    w = torch.tensor([0.25, 0.3, -0.5, 2.0, 1.0 / 16, float("nan"), -0.0, 1.0])
    codes, exact = inq_encode(w, n1, n2)
    assert exact.tolist() == [True, False, True, False, False, False, True, True]
    assert torch.equal(inq_decode(codes, n1, n2)[exact], w[exact])
    assert not codes[~exact].any()


def test_plugin_registers_the_buffers_the_core_reads():
    from torch import nn

    from dg_quant.plugins import inq as plugin

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 8), nn.Linear(8, 2))
    prepared = plugin.prepare_inq(model, plugin.INQOptions())
    assert prepared and [layer.name for layer in iter_inq_layers(model)] == prepared
    for name in prepared:
        assert set(INQ_BUFFERS) <= {b for b, _ in getattr(model, name).named_buffers()}
