"""The one place a ``wilds_run`` model is built: for training and for every rebuild of a run.

``wilds_run`` builds the backbone from the run's settings; ``dgq_export``, ``dgq_ptq``,
``dgq_eoq`` and ``dgq_analyze`` rebuild it from the settings saved in the run's model file. Both
go through ``build_run_model``, so the architecture (image size of a ViT's position embeddings,
token length of a text encoder) and the evaluation input transform are the same in both.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dg_quant.adapters.wilds.transforms import build_transforms
from dg_quant.model import DGModel
from dg_quant.registry import adapter_accepts, create_adapter, resolve_adapter


def adapter_kwargs(config: argparse.Namespace, *, reload: bool = False) -> dict[str, Any]:
    """What the run passes to its backbone adapter, limited to the arguments the adapter declares.

    ``img_size`` goes to adapters that take it when an image transform resizes the inputs (a ViT's
    position embeddings depend on it); ``max_token_length`` when the adapter's own tokenizer is
    used. ``reload``: the weights come from the run's checkpoint, so pretrained files are not read
    again; only a model *folder* is passed (a text encoder's shape and tokenizer live there).
    """
    fn = resolve_adapter(config.model)
    kwargs: dict[str, Any] = {}
    weights = getattr(config, "weights", None)
    if weights is not None and (not reload or Path(str(weights)).is_dir()):
        kwargs["weights"] = weights  # an adapter without weights gets a one-line error from create_adapter
    transform = getattr(config, "transform", None) or "model"
    image_size = getattr(config, "image_size", None)
    if image_size and transform in ("domainbed", "wilds") and adapter_accepts(fn, "img_size"):
        kwargs["img_size"] = image_size
    tokens = getattr(config, "max_token_length", None)
    if tokens and transform == "model" and adapter_accepts(fn, "max_token_length"):
        kwargs["max_token_length"] = tokens
    return kwargs


def build_run_model(config: argparse.Namespace, num_classes: int, *, reload: bool = False) -> DGModel:
    """The run's backbone, with ``model.transform`` set to the run's evaluation input transform.

    Plugins' model changes (quantizers) are not applied here: training applies them through its
    trainer, a rebuild through ``checkpoints.build_model``.
    """
    model = create_adapter(config.model, num_classes=num_classes, **adapter_kwargs(config, reload=reload))
    model.transform = build_transforms(
        getattr(config, "transform", None) or "model", getattr(config, "image_size", None), model
    )[1]
    return model
