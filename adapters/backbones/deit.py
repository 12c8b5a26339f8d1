"""DeiT tiny/small/base (timm, ImageNet-1k weights of Touvron et al.).

Policy: the patch-embedding Conv2d and every Linear of the blocks (``qkv``, ``proj``, ``fc1``,
``fc2``); the classifier, class/position embeddings and LayerNorms stay FP.
"""

from __future__ import annotations

from dg_quant.adapters.backbones.timm_backbone import timm_adapter
from dg_quant.model import DGModel
from dg_quant.registry import register_adapter

TIMM_NAMES = {
    "deit_tiny": "deit_tiny_patch16_224.fb_in1k",
    "deit_small": "deit_small_patch16_224.fb_in1k",
    "deit_base": "deit_base_patch16_224.fb_in1k",
}


def _deit(size: str):
    def adapter(num_classes: int, pretrained: bool = False, weights: str | None = None, img_size: int = 224) -> DGModel:
        return timm_adapter(
            TIMM_NAMES[size],
            num_classes=num_classes,
            pretrained=pretrained,
            weights=weights,
            img_size=img_size,
        )

    adapter.__doc__ = f"timm {TIMM_NAMES[size]}; ``img_size`` other than 224 resamples the position embeddings."
    return register_adapter(adapter, name=size)


deit_tiny = _deit("deit_tiny")
deit_small = _deit("deit_small")
deit_base = _deit("deit_base")


@register_adapter
def test_deit(num_classes: int, weights: str | None = None, img_size: int = 32) -> DGModel:
    """DeiT's code path with two narrow blocks and 8-pixel patches, for fast tests."""
    return timm_adapter(
        "deit_tiny_patch16_224",
        num_classes=num_classes,
        pretrained=False,
        weights=weights,
        img_size=img_size,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
    )
