"""DenseNet-121 (torchvision): the WILDS Camelyon17 baseline (trained from scratch there).

Policy: every Conv2d; the classifier stays FP.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

from torchvision.models import DenseNet121_Weights, densenet121
from torchvision.models.densenet import DenseNet

from dg_quant.adapters.backbones.torchvision_backbone import (
    register_imagenet_adapter,
    torchvision_adapter,
)
from dg_quant.model import DGModel
from dg_quant.registry import register_adapter

# torchvision's DenseNet checkpoints predate its module names: ``norm.1`` is now ``norm1``.
OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def new_keys(state: dict[str, Any]) -> dict[str, Any]:
    """Rename old-style DenseNet keys (as torchvision's own loader does for its weights)."""
    return {OLD_KEY.sub(lambda m: m[1] + m[2], k): v for k, v in state.items()}


register_imagenet_adapter(
    "densenet121",
    densenet121,
    DenseNet121_Weights,
    "classifier",
    "torchvision DenseNet-121; WILDS' Camelyon17 config uses it without pretraining.",
    fix_keys=new_keys,
)


@register_adapter
def test_densenet(num_classes: int, weights: str | None = None, img_size: int = 32) -> DGModel:
    """DenseNet's code path with two short dense blocks, for fast tests."""
    build = partial(DenseNet, growth_rate=8, block_config=(2, 2), num_init_features=16)
    return torchvision_adapter(
        build,
        name="test_densenet",
        head_attr="classifier",
        num_classes=num_classes,
        enum_weights=DenseNet121_Weights.IMAGENET1K_V1,
        pretrained=False,
        weights=weights,
        img_size=img_size,
        fix_keys=new_keys,
    )
