"""CLIP ViT-B/16's visual tower (open_clip) as a featurizer.

Policy: the patch-embedding Conv2d, every attention input projection (the fused
``nn.MultiheadAttention.in_proj_weight``, which is not an ``nn.Linear``), the attention output
projections, the MLP Linears, and CLIP's final image projection, which open_clip keeps as a bare
matrix and this adapter turns into an ``nn.Linear`` so that it is quantized like every other
layer. Class/position embeddings, LayerNorms and the classifier stay FP.

With ``--act_bits``, every one of those layers' inputs is fake-quantized too, the attention output
projection's included: ``quantize_`` makes each attention a ``QuantizableMHA``
(``dg_quant/quant/mha.py``), which calls ``out_proj`` instead of reading its weight.
"""

from __future__ import annotations

import torch
from huggingface_hub.constants import HF_HUB_CACHE
from torch import nn

from dg_quant.adapters.backbones.transforms import image_transform
from dg_quant.adapters.backbones.weights import (
    hub_call,
    local_path,
    missing_message,
    require_hub_cache,
    wants_pretrained,
)
from dg_quant.errors import ConfigError, require_optional
from dg_quant.model import DGModel
from dg_quant.registry import register_adapter

ARCH = "ViT-B-16"
CLIP_WEIGHT_FILES = (
    "open_clip_pytorch_model.bin",
    "open_clip_model.safetensors",
)  # open_clip's hub names
# open_clip sets ``preprocess_cfg`` only on models it builds from a named config; these are its
# OPENAI_DATASET_MEAN/STD (open_clip itself is imported only when a CLIP model is built).
OPENAI_PREPROCESS = {
    "mean": (0.48145466, 0.4578275, 0.40821073),
    "std": (0.26862954, 0.26130258, 0.27577711),
    "interpolation": "bicubic",
}


class CLIPImageFeaturizer(nn.Module):
    """open_clip's ``VisionTransformer`` with its output projection as an ``nn.Linear``."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        proj = visual.proj
        visual.proj = None  # the tower now returns the pooled width-d token
        self.visual = visual
        self.proj = nn.Linear(proj.shape[0], proj.shape[1], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(proj.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.visual(x))


def clip_adapter(visual: nn.Module, num_classes: int) -> DGModel:
    """Wrap a CLIP visual tower: featurizer, a new head, and CLIP's own image normalisation."""
    featurizer = CLIPImageFeaturizer(visual)
    cfg = getattr(visual, "preprocess_cfg", None) or OPENAI_PREPROCESS
    size = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
    transform = image_transform(size, cfg["mean"], cfg["std"], crop_pct=1.0, interpolation=cfg["interpolation"])
    d_out = featurizer.proj.out_features
    return DGModel(featurizer, nn.Linear(d_out, num_classes), d_out, transform)


@register_adapter
def clip_vit_b16(
    num_classes: int,
    pretrained: bool = False,
    weights: str | None = None,
    tag: str = "openai",
    img_size: int = 224,
) -> DGModel:
    """open_clip ViT-B/16 visual tower; ``tag``: ``openai`` (default), ``laion2b_s34b_b88k``, ..."""
    open_clip = require_optional("open_clip")

    cfg = open_clip.get_pretrained_cfg(ARCH, tag)
    if not cfg:
        raise ConfigError(
            f"unknown open_clip tag {tag!r} for {ARCH}; choose from "
            f"{', '.join(open_clip.list_pretrained_tags_by_model(ARCH))}"
        )
    path = local_path(weights)
    source = str(path) if path is not None else (tag if wants_pretrained(pretrained, weights) else None)
    hub = f"https://huggingface.co/{cfg['hf_hub'].rstrip('/')}" if cfg.get("hf_hub") else cfg.get("url", tag)
    if source == tag and cfg.get("hf_hub"):
        require_hub_cache(cfg["hf_hub"].rstrip("/"), CLIP_WEIGHT_FILES, f"{ARCH} ({tag})")
    if path is not None:
        message = f"cannot load --weights {str(path)!r} into open_clip {ARCH}; pass a {ARCH} checkpoint"
    else:
        message = missing_message(f"{ARCH} ({tag})", CLIP_WEIGHT_FILES[0], hub, HF_HUB_CACHE)
    model = hub_call(
        lambda: open_clip.create_model(
            ARCH,
            pretrained=source,
            force_image_size=img_size,
            force_quick_gelu=bool(cfg.get("quick_gelu")),
        ),
        message,
    )
    return clip_adapter(model.visual, num_classes)


@register_adapter
def test_clip_vit(num_classes: int, img_size: int = 32) -> DGModel:
    """The same open_clip ``VisionTransformer`` class with two narrow blocks, for fast tests."""
    VisionTransformer = require_optional("open_clip.transformer").VisionTransformer  # noqa: N806

    visual = VisionTransformer(
        image_size=img_size, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16
    )
    return clip_adapter(visual, num_classes)
