"""DomainBed's pretrained backbones offline: random weights on request, a fast clear failure otherwise.

DomainBed's ``networks`` build ImageNet backbones with downloads: torchvision's ResNet-18/50
(``pretrained=True``), timm's ``resnet50.ram_in1k`` (from the Hugging Face hub, the
``resnet50_augmix`` default, built after the torchvision ResNet-50) and DINOv2 through
``torch.hub`` (``vit`` + ``dinov2``). ``train.py`` builds the network only after loading the
data (minutes), so an offline run fails late with a long traceback; ``check_backbone_weights``
builds it first and turns that failure into one line naming the files and ``--no_pretrained``.
``random_init_backbones`` builds every one of them without downloading weights (for
``--no_pretrained`` and for reloading a ``model.pkl``, whose own weights replace them anyway).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dg_quant.errors import ConfigError

IMAGE_SHAPE = (3, 224, 224)  # what DomainBed's image datasets feed the ResNet/ViT featurizers


def _without_weights(build: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    kwargs.pop("pretrained", None)
    kwargs["weights"] = None
    return build(*args, **kwargs)


def _timm_without_weights(create: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    kwargs["pretrained"] = False
    return create(*args, **kwargs)


def _hub_without_weights(load: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    kwargs["pretrained"] = False  # DINOv2's hub entry points take it; the code still comes from the hub cache
    try:
        return load(*args, **kwargs)
    except RuntimeError as exc:
        if "no internet connection" in str(exc):
            raise ConfigError(
                f"torch.hub.load{args[:2]}: {exc}; --no_pretrained skips the weights, not the "
                "model code: copy the hub repository into torch.hub.get_dir() on this machine"
            ) from None
        raise


def _patches() -> list[tuple[Any, str, Callable[..., Any]]]:
    import timm
    import torchvision.models

    patches = [
        (torchvision.models, name, functools.partial(_without_weights, getattr(torchvision.models, name)))
        for name in ("resnet18", "resnet50")
    ]
    patches.append((timm, "create_model", functools.partial(_timm_without_weights, timm.create_model)))
    patches.append((torch.hub, "load", functools.partial(_hub_without_weights, torch.hub.load)))
    return patches


@contextlib.contextmanager
def random_init_backbones() -> Iterator[None]:
    """Within the block, DomainBed's backbones are built with random weights (nothing downloaded)."""
    saved = []
    for owner, name, replacement in _patches():
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def weight_files(hparams: Mapping[str, Any]) -> list[str]:
    """The pretrained files DomainBed's image featurizer loads for ``hparams`` (its own logic)."""
    if hparams.get("vit") and hparams.get("dinov2"):
        return [
            f"the torch.hub repository facebookresearch/dinov2 and dinov2_vitb14_pretrain.pth in {torch.hub.get_dir()}"
        ]
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    resnet = "resnet18-f37072fd.pth" if hparams.get("resnet18") else "resnet50-0676ba61.pth"
    files = [f"{checkpoints / resnet} (torchvision)"]
    if hparams.get("resnet50_augmix", False):
        files.append("timm's resnet50.ram_in1k (Hugging Face hub: timm/resnet50.ram_in1k)")
    return files


def train_hparams(argv: Sequence[str], registry: Any, misc: Any) -> tuple[str, dict[str, Any]]:
    """(dataset, hparams) exactly as DomainBed's ``train.py`` derives them from its flags."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--dataset", default="RotatedMNIST")
    parser.add_argument("--algorithm", default="ERM")
    parser.add_argument("--hparams")
    parser.add_argument("--hparams_seed", type=int, default=0)
    parser.add_argument("--trial_seed", type=int, default=0)
    args, _ = parser.parse_known_args(list(argv))
    if args.hparams_seed == 0:
        hparams = registry.default_hparams(args.algorithm, args.dataset)
    else:
        hparams = registry.random_hparams(
            args.algorithm, args.dataset, misc.seed_hash(args.hparams_seed, args.trial_seed)
        )
    if args.hparams:
        hparams.update(json.loads(args.hparams))
    return args.dataset, hparams


def image_dataset(datasets: Any, name: str) -> bool:
    """Does DomainBed feed this dataset to the 224-pixel (pretrained) featurizers?"""
    try:
        cls = datasets.get_dataset_class(name)
    except (NotImplementedError, KeyError, AttributeError):
        return False
    shape = getattr(cls, "INPUT_SHAPE", None) or getattr(cls, "input_shape", None)
    if shape is not None:
        return tuple(shape[1:3]) == IMAGE_SHAPE[1:]
    folder = getattr(datasets, "MultipleEnvironmentImageFolder", None)
    wilds = getattr(datasets, "WILDSDataset", None)
    return any(base is not None and issubclass(cls, base) for base in (folder, wilds))


def check_backbone_weights(argv: Sequence[str], package: str = "domainbed") -> None:
    """Build the run's featurizer now, before ``train.py`` loads the data, so that missing
    pretrained weights fail in one line naming the files and ``--no_pretrained``."""
    try:
        datasets = importlib.import_module(f"{package}.datasets")
        networks = importlib.import_module(f"{package}.networks")
        registry = importlib.import_module(f"{package}.hparams_registry")
        misc = importlib.import_module(f"{package}.lib.misc")
        dataset, hparams = train_hparams(argv, registry, misc)
    except (ImportError, json.JSONDecodeError, NotImplementedError, KeyError):
        return  # train.py reports its own flag errors
    if not image_dataset(datasets, dataset):
        return
    try:
        with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" would come twice
            warnings.simplefilter("ignore")
            networks.Featurizer(IMAGE_SHAPE, hparams)
    except (OSError, RuntimeError) as exc:  # URLError, HF hub's LocalEntryNotFoundError, hub's "no internet"
        if not isinstance(exc, OSError) and "internet" not in str(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"DomainBed's backbone for {dataset} needs pretrained weights that could not be loaded "
            f"({type(exc).__name__}: {first[:160]}): put {' and '.join(weight_files(hparams))} on this machine, "
            "or pass --no_pretrained (random weights, marked in the results; not for reported numbers)"
        ) from None
