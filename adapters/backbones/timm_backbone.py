"""Turn a timm model into a ``DGModel``: timm loads the weights (hub, cache or local file)."""

from __future__ import annotations

from typing import Any

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
from dg_quant.model import DGModel

TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm fetches from the hub


def hub_source(arch: str) -> str:
    """Where timm downloads ``arch``'s default weights from (for error messages)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is not None and cfg.hf_hub_id:
        return f"https://huggingface.co/{cfg.hf_hub_id}"
    return (cfg.url if cfg is not None and cfg.url else None) or f"timm's hub entry for {arch}"


def require_cached(arch: str) -> None:
    """Offline: fail before building ``arch`` unless timm's hub file for it is cached."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is not None and cfg.hf_hub_id:
        require_hub_cache(cfg.hf_hub_id.split("@")[0], TIMM_WEIGHT_FILES, arch)


def timm_adapter(
    arch: str,
    *,
    num_classes: int,
    pretrained: bool,
    weights: str | None,
    img_size: int = 224,
    fixed_size: bool = True,
    **model_kwargs: Any,
) -> DGModel:
    """``timm.create_model(arch)`` split into featurizer and head.

    ``fixed_size``: the architecture takes ``img_size`` at construction (ViTs; timm resamples the
    position embeddings of pretrained weights). ``weights=PATH`` goes through timm's own
    ``pretrained_cfg_overlay=dict(file=PATH)``, so timm's checkpoint filters still apply.
    """
    import timm  # heavy: imported when a timm backbone is built, not when the registry loads

    path = local_path(weights)
    loaded = wants_pretrained(pretrained, weights)
    kwargs = dict(model_kwargs)
    if fixed_size:
        kwargs["img_size"] = img_size
    if path is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    if loaded and path is None:
        require_cached(arch)
    if path is not None:
        message = f"cannot load --weights {str(path)!r} into {arch}; pass a checkpoint of {arch}"
    else:
        message = missing_message(arch, TIMM_WEIGHT_FILES[0], hub_source(arch), HF_HUB_CACHE)
    model = hub_call(lambda: timm.create_model(arch, pretrained=loaded, **kwargs), message)
    old = model.get_classifier()
    head = nn.Linear(model.num_features, num_classes)
    if loaded and isinstance(old, nn.Linear) and old.out_features == num_classes:
        head.load_state_dict(old.state_dict())
    model.reset_classifier(0)
    data = timm.data.resolve_data_config(model=model)
    transform = image_transform(img_size, data["mean"], data["std"], data["crop_pct"], data["interpolation"])
    return DGModel(model, head, model.num_features, transform)
