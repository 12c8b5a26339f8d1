"""The evaluation image transform every image adapter returns as ``model.transform``.

torchvision's v2 transforms accept PIL images, uint8 tensors and float tensors alike, so one
transform serves WILDS datasets (PIL) and in-memory tensors; grayscale inputs become RGB.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_transform(
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
) -> v2.Compose:
    """Resize the short side to ``size / crop_pct``, centre-crop ``size``, scale, normalise."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RGB(),
            v2.Resize(
                int(round(size / crop_pct)),
                interpolation=InterpolationMode(interpolation),
                antialias=True,
            ),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )
