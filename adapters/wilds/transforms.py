"""Input transforms of the two hosts, chosen per dataset by ``--transform``.

- ``domainbed``: DomainBed's image pipeline: training augmentation (random resized crop with scale
  0.7-1, flip, colour jitter 0.3, random grayscale) and a plain resize for evaluation;
- ``wilds``: the WILDS examples' ``image_base``: resize, no augmentation (Camelyon17's official);
- ``model``: the backbone's own ``transform`` (a tokenizer for text models, or nothing);
- ``none``: the dataset's inputs as they are.

Unlike DomainBed, which augments the whole training environments (their validation part too),
evaluation here always uses the deterministic transform, so validation numbers do not jitter.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dg_quant.errors import ConfigError

if TYPE_CHECKING:
    from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRANSFORMS = ("domainbed", "wilds", "model", "none")

Transform = Callable[[Any], Any]


def _tv() -> Any:
    """torchvision's transforms, imported when a transform is built (``wilds_run --help`` stays fast)."""
    return importlib.import_module("torchvision.transforms")


def _normalize() -> list[Any]:
    T = _tv()
    return [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def resize_transform(size: int) -> T.Compose:
    """Resize to ``size`` x ``size`` and normalise with ImageNet statistics (evaluation, WILDS)."""
    T = _tv()
    return T.Compose([T.Resize((size, size)), *_normalize()])


def domainbed_train_transform(size: int) -> T.Compose:
    """DomainBed's ``augment_transform`` at ``size`` pixels."""
    T = _tv()
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.7, 1.0)),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.3, 0.3, 0.3, 0.3),
            T.RandomGrayscale(),
            *_normalize(),
        ]
    )


def build_transforms(kind: str, image_size: int | None, model: Any) -> tuple[Transform | None, Transform | None]:
    """``(train, eval)`` transforms of ``kind``; ``model`` supplies its own for ``kind='model'``."""
    if kind == "model":
        own = getattr(model, "transform", None)
        return own, own
    if kind == "none":
        return None, None
    if kind not in TRANSFORMS:
        raise ConfigError(f"unknown --transform {kind!r}; choose from {', '.join(TRANSFORMS)}")
    if not image_size or image_size <= 0:
        raise ConfigError(f"--transform {kind} needs a positive --image_size; got {image_size}")
    if kind == "domainbed":
        return domainbed_train_transform(image_size), resize_transform(image_size)
    return resize_transform(image_size), resize_transform(image_size)
