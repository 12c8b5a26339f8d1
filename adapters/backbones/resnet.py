"""ResNet-50, ResNet-18 and ResNeXt-50 32x4d (torchvision; ResNeXt also with timm's IG-1B weights).

QT-DoG's main backbone is torchvision's ImageNet ResNet-50 (``IMAGENET1K_V1``, the weights
DomainBed's ``pretrained=True`` loads); ResNet-18 is DomainBed's ``resnet18`` hparam and the
deployment benchmark's small CNN; its appendix also uses ResNeXt-50 32x4d pretrained on
Instagram-1B (timm ``resnext50_32x4d.fb_swsl_ig1b_ft_in1k``). Policy: every Conv2d weight,
stem and downsample convolutions included; the classifier stays FP.
"""

from __future__ import annotations

from functools import partial

from torchvision.models import (
    ResNet18_Weights,
    ResNet50_Weights,
    ResNeXt50_32X4D_Weights,
    resnet18,
    resnet50,
    resnext50_32x4d,
)
from torchvision.models.resnet import Bottleneck, ResNet

from dg_quant.adapters.backbones.timm_backbone import timm_adapter
from dg_quant.adapters.backbones.torchvision_backbone import (
    register_imagenet_adapter,
    torchvision_adapter,
)
from dg_quant.model import DGModel
from dg_quant.registry import register_adapter

IG1B_TIMM_NAME = "resnext50_32x4d.fb_swsl_ig1b_ft_in1k"


register_imagenet_adapter(
    "resnet50",
    resnet50,
    ResNet50_Weights,
    "fc",
    "torchvision ResNet-50; ``tag`` picks the torchvision weights (``IMAGENET1K_V2`` is newer).",
)
register_imagenet_adapter(
    "resnet18",
    resnet18,
    ResNet18_Weights,
    "fc",
    "torchvision ResNet-18 (ImageNet); DomainBed's ``resnet18`` backbone.",
)
register_imagenet_adapter(
    "resnext50_32x4d",
    resnext50_32x4d,
    ResNeXt50_32X4D_Weights,
    "fc",
    "torchvision ResNeXt-50 32x4d (ImageNet).",
)


@register_adapter
def resnext50_32x4d_ig1b(
    num_classes: int, pretrained: bool = False, weights: str | None = None, img_size: int = 224
) -> DGModel:
    """ResNeXt-50 32x4d, timm's semi-weakly supervised Instagram-1B weights (QT-DoG appendix)."""
    return timm_adapter(
        IG1B_TIMM_NAME,
        num_classes=num_classes,
        pretrained=pretrained,
        weights=weights,
        img_size=img_size,
        fixed_size=False,
    )


@register_adapter
def test_resnet(num_classes: int, weights: str | None = None, img_size: int = 32) -> DGModel:
    """ResNet-50's code path with one bottleneck per stage, for fast tests."""
    return torchvision_adapter(
        partial(ResNet, Bottleneck, [1, 1, 1, 1]),
        name="test_resnet",
        head_attr="fc",
        num_classes=num_classes,
        enum_weights=ResNet50_Weights.IMAGENET1K_V1,
        pretrained=False,
        weights=weights,
        img_size=img_size,
    )


@register_adapter
def test_resnext(num_classes: int, weights: str | None = None, img_size: int = 32) -> DGModel:
    """ResNeXt's grouped-convolution code path, one narrow bottleneck per stage, for fast tests."""
    build = partial(ResNet, Bottleneck, [1, 1, 1, 1], groups=8, width_per_group=4)
    return torchvision_adapter(
        build,
        name="test_resnext",
        head_attr="fc",
        num_classes=num_classes,
        enum_weights=ResNeXt50_32X4D_Weights.IMAGENET1K_V1,
        pretrained=False,
        weights=weights,
        img_size=img_size,
    )
