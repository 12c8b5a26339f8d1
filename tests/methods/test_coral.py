"""CORAL penalty against the formula written out with numpy, pair by pair."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dg_quant.methods.coral import coral_penalty, domain_coral_penalty, penalty_weight_for


def numpy_coral(x: np.ndarray, y: np.ndarray) -> float:
    cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)  # unbiased, as Deep CORAL
    return float(np.mean((x.mean(0) - y.mean(0)) ** 2) + np.mean((cx - cy) ** 2))


def test_coral_penalty_matches_numpy() -> None:
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64) * 2 + 1
    assert float(coral_penalty(x, y)) == pytest.approx(numpy_coral(x.numpy(), y.numpy()), rel=1e-6)


def test_domain_penalty_is_the_mean_over_domain_pairs_and_skips_singletons() -> None:
    features = torch.randn(20, 4)
    domains = torch.tensor([0] * 6 + [2] * 7 + [5] * 6 + [9])  # domain 9 has one sample: no covariance
    groups = [features[domains == d].numpy() for d in (0, 2, 5)]
    expected = np.mean([numpy_coral(a, b) for a, b in itertools.combinations(groups, 2)])
    assert float(domain_coral_penalty(features, domains)) == pytest.approx(expected, rel=1e-5)


def test_one_domain_gives_zero_with_a_gradient_path() -> None:
    features = torch.randn(8, 3, requires_grad=True)
    penalty = domain_coral_penalty(features, torch.zeros(8, dtype=torch.long))
    penalty.backward()
    assert float(penalty.detach()) == 0.0 and features.grad is not None


def test_penalty_gradient_pulls_domains_together() -> None:
    a = torch.randn(16, 3)
    b = (torch.randn(16, 3) * 3 + 2).requires_grad_(True)
    before = float(coral_penalty(a, b))
    coral_penalty(a, b).backward()
    with torch.no_grad():
        b -= 0.05 * b.grad
    assert float(coral_penalty(a, b)) < before


def test_wilds_weights() -> None:
    assert penalty_weight_for("camelyon17") == 0.1
    assert penalty_weight_for("amazon") == 10.0
    assert penalty_weight_for("pacs") == 1.0
