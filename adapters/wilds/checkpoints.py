"""Rebuild a trained model from a ``wilds_run`` folder, and evaluate models on its dataset.

A quantized checkpoint holds parametrized weights (``...parametrizations.weight.original``) and
quantizer state, so the quantizers must exist before ``load_state_dict``: the model is rebuilt
with the backbone adapter, then the run's own plugins re-apply ``dgq_configure_model`` with the
saved settings, then the weights are loaded.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from dg_quant.adapters.wilds.datasets import FULL_SPLITS, SubsetSpec
from dg_quant.context import RunContext
from dg_quant.errors import CheckpointError
from dg_quant.host import PluginHost
from dg_quant.io import load_torch_file

CHECKPOINT_FILES = {"best": "best_model.pt", "last": "model.pt"}


class LoadedRun(NamedTuple):
    """What ``load_run_model`` returns; unpacks as ``model, config, load_dataset``."""

    model: nn.Module
    config: argparse.Namespace
    load_dataset: Callable[[], Any]


def checkpoint_path(run_dir: str | Path, which: str = "best") -> Path:
    """``best_model.pt`` (best ``val_metric``) or ``model.pt`` (last step) of a run folder."""
    if which not in CHECKPOINT_FILES:
        raise CheckpointError(f"unknown checkpoint {which!r}; choose {' or '.join(CHECKPOINT_FILES)}")
    path = Path(run_dir) / CHECKPOINT_FILES[which]
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no {path.name}; is it a finished wilds_run folder?")
    return path


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """A model file written by ``wilds_run``, checksums verified (``dg_quant.io.load_torch_file``),
    with a one-line error if it is damaged, truncated or foreign."""
    state = load_torch_file(path, map_location=device)
    if not isinstance(state, dict) or not {"model", "backbone", "num_classes", "config"} <= set(state):
        raise CheckpointError(f"{path} is not a wilds_run model file (needs model, backbone, num_classes, config)")
    return state


def saved_context(config: argparse.Namespace) -> RunContext:
    """The context of a finished run, from the settings it saved (``runner.saved_settings``).

    ``log_dir`` stays None: a rebuilt model is looked at, and its plugins must not write into the
    run's folder.
    """
    return RunContext(
        host="wilds_run",
        dataset=getattr(config, "dataset", None),
        total_steps=getattr(config, "total_steps", None),
        steps_per_epoch=getattr(config, "steps_per_epoch", None),
        eval_every=getattr(config, "eval_every", None),
        plugins=tuple(getattr(config, "plugins", None) or ()),
    )


def build_model(
    state: dict[str, Any], config: argparse.Namespace, host: PluginHost | None = None, added: Sequence[str] = ()
) -> nn.Module:
    """The run's architecture with its plugins' model changes (quantizers), weights loaded.

    The backbone is built as ``wilds_run`` built it, without downloading pretrained weights (the
    checkpoint replaces them). ``model.transform`` becomes the run's *evaluation* input transform
    (``--transform``/``--image_size``), so ``eval_loader`` feeds the model what it was tested on.
    ``host``: a host with more plugins than the run had (``dgq_ptq`` adds ``dg_quant.obc``), named
    in ``added``; the quantizers those attach are not in the checkpoint and keep their new state.
    """
    from dg_quant.adapters.wilds.run_model import build_run_model

    config.model = state["backbone"]
    model = build_run_model(config, int(state["num_classes"]), reload=True)
    host = host or PluginHost(config.plugins)
    context = host.configure(config, saved_context(config))
    host.hook.dgq_configure_model(model=model, config=config, context=context)
    try:
        if added:
            _load_under_new_quantizers(model, state["model"])
        else:
            model.load_state_dict(state["model"])
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        first = lines[1].strip() if len(lines) > 1 else str(exc)
        raise CheckpointError(
            f"the saved weights do not fit the rebuilt model ({first}); were the plugins changed since the run?"
        ) from None
    return model


def _load_under_new_quantizers(model: nn.Module, weights: dict[str, Any]) -> None:
    """Load weights saved before quantizers were attached: ``layer.weight`` goes to
    ``layer.parametrizations.weight.original``; only the new quantizers' own state may be missing."""
    expected = model.state_dict()
    renamed = {}
    for key, value in weights.items():
        module, _, tensor = key.rpartition(".")
        original = f"{module}.parametrizations.{tensor}.original" if module else f"parametrizations.{tensor}.original"
        renamed[original if key not in expected and original in expected else key] = value
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    stray = [k for k in missing if ".parametrizations." not in k or k.endswith(".original")]
    if stray or unexpected:
        raise RuntimeError(f"Error(s) in loading state_dict:\n\tmissing {stray[:3]}, unexpected {unexpected[:3]}")


def load_run_model(run_dir: str | Path, which: str = "best", device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild the model of ``run_dir`` at its best-validation (``best``) or last (``last``) state.

    The model is in eval mode on ``device``; ``load_dataset()`` builds the run's dataset (same
    split settings), so the model can be evaluated on the splits it was trained and tested on.
    """
    state = read_checkpoint(checkpoint_path(run_dir, which), device)
    config = argparse.Namespace(**state["config"])
    config.plugins = list(getattr(config, "plugins", None) or [])
    model = build_model(state, config).to(device).eval()
    return LoadedRun(model, config, lambda: run_dataset(config))


def run_dataset(config: argparse.Namespace) -> Any:
    """The dataset of a run's saved config (same name, root, test domains and split seed)."""
    from dg_quant.adapters.wilds.datasets import load_dataset

    return load_dataset(config)


_load_dataset = run_dataset  # the name dgq_export imported first


def eval_loader(
    dataset: Any,
    split: str,
    model: nn.Module,
    batch_size: int = 256,
    subsets: SubsetSpec = FULL_SPLITS,
    sample: int | None = None,
    seed: int = 0,
):
    """A WILDS standard (sequential) loader over ``split`` (the run's ``subsets`` of it, by default
    all of it) with the model's input transform.

    ``sample``: at most that many examples, drawn at random (``seed``) from the whole split. Splits
    are stored in class or domain order (DomainBed-layout folders by class), so their first batches
    are not a sample of them.
    """
    from wilds.common.data_loaders import get_eval_loader
    from wilds.datasets.wilds_dataset import WILDSSubset

    subset = subsets.subset(dataset, split, getattr(model, "transform", None))
    if sample is not None and sample < len(subset):
        chosen = torch.randperm(len(subset), generator=torch.Generator().manual_seed(seed))[:sample].sort().values
        subset = WILDSSubset(subset.dataset, subset.indices[chosen.numpy()], subset.transform)
    return get_eval_loader("standard", subset, batch_size=batch_size)


@torch.no_grad()
def predict(
    model: nn.Module, loader: Iterable, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of ``model`` (in eval mode) over a loader, with labels and metadata, on the CPU."""
    was_training = model.training
    model.eval()
    logits, ys, metas = [], [], []
    for x, y, meta in loader:
        logits.append(model(x.to(device)).float().cpu())
        ys.append(y)
        metas.append(meta)
    model.train(was_training)
    return torch.cat(logits), torch.cat(ys), torch.cat(metas)


def split_metrics(dataset: Any, split: str, logits: torch.Tensor, y: torch.Tensor, meta: torch.Tensor) -> dict:
    """``<split>/<metric>`` from the dataset's ``eval`` plus the mean cross-entropy; groups absent
    from the split (WILDS reports them as 0) are left out, as ``wilds_run`` does."""
    results, _ = dataset.eval(logits.argmax(dim=1), y, meta)
    empty = {k.split("count_", 1)[1] for k, v in results.items() if k.startswith("count_") and not v}
    record = {
        f"{split}/{k}": (v.item() if hasattr(v, "item") else v)
        for k, v in results.items()
        if not (":" in k and k.split("_", 1)[1] in empty)
    }
    record[f"{split}/loss"] = float(nn.functional.cross_entropy(logits, y))
    return record


def evaluate_splits(
    model: nn.Module,
    dataset: Any,
    splits: Iterable[str],
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    subsets: SubsetSpec = FULL_SPLITS,
) -> dict[str, Any]:
    """Flat ``<split>/<metric>`` record (as in ``results.jsonl``) from the dataset's own ``eval``,
    on the examples the run evaluated when ``subsets`` is the run's (``SubsetSpec.of(config)``)."""
    record: dict[str, Any] = {}
    for split in splits:
        loader = eval_loader(dataset, split, model, batch_size, subsets)
        record.update(split_metrics(dataset, split, *predict(model, loader, device)))
    return record


def present_splits(dataset: Any, exclude: Iterable[str] = ("train",)) -> list[str]:
    """The dataset's splits that hold examples, in the order ``wilds_run`` evaluates them."""
    order = ("train", "id_val", "val", "test", "id_test")
    names = [s for s in order if s in dataset.split_dict] + [s for s in dataset.split_dict if s not in order]
    skip = set(exclude)
    return [s for s in names if s not in skip and (dataset.split_array == dataset.split_dict[s]).any()]
