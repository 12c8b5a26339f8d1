"""Deep CORAL (Sun & Saenko, 2016): match feature means and covariances across domains.

The penalty between two sets of features is WILDS' and DomainBed's: the mean squared difference
of the means plus the mean squared difference of the (unbiased) covariance matrices. A batch
holding several domains is penalised by the mean over its pairs of domains.
"""

from __future__ import annotations

import torch

# WILDS' per-dataset CORAL penalty weights (examples/configs/datasets.py); camelyon17 has none
# there and takes 0.1, the value the WILDS paper's tuning chose. Others: DomainBed's mmd_gamma 1.0.
WILDS_PENALTY_WEIGHTS: dict[str, float] = {
    "amazon": 10.0,
    "camelyon17": 0.1,
    "fmow": 0.1,
    "iwildcam": 0.1,
    "ogb-molpcba": 0.1,
    "poverty": 10.0,
}
DEFAULT_PENALTY_WEIGHT = 1.0


def penalty_weight_for(dataset: str | None) -> float:
    """The CORAL weight WILDS uses for ``dataset`` (DomainBed's 1.0 for any other dataset)."""
    return WILDS_PENALTY_WEIGHTS.get(str(dataset or "").lower(), DEFAULT_PENALTY_WEIGHT)


def coral_penalty(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``mean((mu_x - mu_y)^2) + mean((C_x - C_y)^2)`` for features ``[n, d]`` of two domains."""
    x, y = x.flatten(1).float(), y.flatten(1).float()
    mean_x, mean_y = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
    cent_x, cent_y = x - mean_x, y - mean_y
    cova_x = cent_x.t() @ cent_x / (len(x) - 1)
    cova_y = cent_y.t() @ cent_y / (len(y) - 1)
    return (mean_x - mean_y).pow(2).mean() + (cova_x - cova_y).pow(2).mean()


def domain_coral_penalty(features: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
    """Mean ``coral_penalty`` over every pair of domains in the batch with 2+ samples each.

    Zero (with a gradient path) when fewer than two domains qualify: a covariance needs two samples.
    """
    groups = [features[domains == d] for d in torch.unique(domains)]
    groups = [g for g in groups if len(g) >= 2]
    pairs = [(i, j) for i in range(len(groups)) for j in range(i + 1, len(groups))]
    if not pairs:
        return features.sum() * 0.0
    return torch.stack([coral_penalty(groups[i], groups[j]) for i, j in pairs]).mean()
