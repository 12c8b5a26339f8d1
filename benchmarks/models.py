"""The backbones the harness times, built with random weights (no model hub is reached)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dg_quant.errors import ConfigError
from dg_quant.registry import adapter_accepts, create_adapter, list_adapters, resolve_adapter

NUM_CLASSES = 7


@dataclass(frozen=True)
class Workload:
    """A model with the batch it is timed on."""

    name: str
    model: nn.Module
    input_shape: tuple[int, ...]  # one sample, without the batch dimension
    batch_size: int


def _torchvision(name: str) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES)


def _deit_tiny(image_size: int) -> nn.Module:
    import timm

    return timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES, img_size=image_size)


# name -> (builder(image_size), channels, fixed image size or None, default CPU batch, default CUDA batch)
MODELS = {
    "digits_cnn": (lambda size: create_adapter("digits_cnn", NUM_CLASSES), 1, 16, 64, 256),
    "resnet18": (lambda size: _torchvision("resnet18"), 3, None, 16, 128),
    "resnet50": (lambda size: _torchvision("resnet50"), 3, None, 8, 96),
    "deit_tiny": (_deit_tiny, 3, None, 16, 96),
}


def _from_registry(name: str, size: int) -> nn.Module:
    """Any other backbone of the project's adapter registry, with random weights (3-channel images)."""
    takes_size = adapter_accepts(resolve_adapter(name), "img_size")  # not all adapters have one
    return create_adapter(name, NUM_CLASSES, img_size=size if takes_size else None)


def build(name: str, image_size: int, batch_size: int | None, device: torch.device) -> Workload:
    """Build ``name`` for ``image_size`` inputs; the batch defaults per model and device type."""
    if name not in MODELS:
        if name not in list_adapters():
            known = sorted(set(MODELS) | set(list_adapters()))
            raise ConfigError(f"unknown benchmark model {name!r}; pick from {', '.join(known)}")
        cuda = device.type == "cuda"
        return Workload(
            name,
            _from_registry(name, image_size),
            (3, image_size, image_size),
            batch_size or (96 if cuda else 8),
        )
    builder, channels, fixed_size, cpu_batch, cuda_batch = MODELS[name]
    size = fixed_size or image_size
    batch = batch_size or (cuda_batch if device.type == "cuda" else cpu_batch)
    return Workload(name, builder(size), (channels, size, size), batch)
