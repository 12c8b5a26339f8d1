"""The model shape every host and plugin relies on: a featurizer followed by a classifier."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class DGModel(nn.Module):
    """``classifier(featurizer(x))`` with the pieces named, so that policies can find the head.

    ``featurizer`` maps an input batch to ``[B, d_out]`` features; ``classifier`` is the head
    (an ``nn.Linear`` by default) that the quantization policy keeps in full precision.
    """

    def __init__(self, featurizer: nn.Module, classifier: nn.Module, d_out: int, transform: Any = None) -> None:
        super().__init__()
        self.featurizer = featurizer
        self.classifier = classifier
        self.d_out = d_out
        # Input transform (images) or tokenizer callable (text); not a module, not saved.
        self.transform = transform

    def __setattr__(self, name: str, value: Any) -> None:
        # torchvision's v2 transforms are nn.Modules: kept as a child, ``transform`` could not be
        # replaced by a v1 transform (a plain callable) and would show up in ``modules()``.
        if name == "transform":
            self.__dict__[name] = value
            return
        super().__setattr__(name, value)

    @property
    def num_features(self) -> int:
        return self.d_out

    def forward_features(self, x: Any) -> torch.Tensor:
        return self.featurizer(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return features if pre_logits else self.classifier(features)

    def forward(self, x: Any) -> torch.Tensor:
        return self.classifier(self.featurizer(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.d_out, num_classes).to(next(self.featurizer.parameters()).device)
