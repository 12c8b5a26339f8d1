"""A backbone the project does not ship, as a user would write it (see docs/backbones.md).

``wilds_run --model tests.user_backbone:small_cnn --weights FILE`` trains it, and every command
that rebuilds the run imports it again by that name.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation
from torchvision.transforms import v2

from dg_quant.model import DGModel


def small_cnn(num_classes: int, weights: str | None = None, img_size: int = 32) -> DGModel:
    """Two torchvision conv blocks and a linear head; ``weights``: a featurizer state dict file."""
    featurizer = nn.Sequential(
        Conv2dNormActivation(3, 8, stride=2),
        Conv2dNormActivation(8, 16, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    if weights is not None:
        featurizer.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    transform = v2.Compose(
        [v2.ToImage(), v2.RGB(), v2.Resize((img_size, img_size)), v2.ToDtype(torch.float32, scale=True)]
    )
    return DGModel(featurizer, nn.Linear(16, num_classes), 16, transform)


def not_a_model(num_classes: int) -> nn.Module:
    """A factory that breaks the contract: a bare network instead of a ``DGModel``."""
    return nn.Linear(4, num_classes)


def groupnorm_cnn(num_classes: int, in_channels: int = 1, width: int = 8) -> DGModel:
    """Conv-GroupNorm-ReLU blocks: per-sample normalisation, so a data-parallel run (each process
    normalising its share of the batch) computes what one process computes on the whole batch."""
    featurizer = nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.GroupNorm(2, width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.GroupNorm(2, 2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return DGModel(featurizer, nn.Linear(2 * width, num_classes), 2 * width)
