"""One ``wilds_run`` training run: data, model, the hook-driven loop, evaluation and results.

Results in ``log_dir`` (each written atomically, so a killed run never leaves a torn file):

- ``config.json``: every setting of the run;
- ``results.jsonl``: one record per evaluation, flat keys ``<split>/<metric>``;
- ``last.pt``: the state to ``--resume`` from (model, optimizer, quantizers, RNG, records);
- ``best_model.pt``, ``model.pt``: weights at the best ``val_metric`` and at the end;
- ``final.json``: last-step and best-validation metrics plus the compression report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dg_quant.adapters.wilds.compat import import_wilds
from dg_quant.adapters.wilds.datasets import load_dataset
from dg_quant.errors import CheckpointError, ConfigError
from dg_quant.host import PluginHost
from dg_quant.io import atomic_torch_save, atomic_write_json, atomic_write_jsonl
from dg_quant.loop import Trainer, scalar_metrics
from dg_quant.quant import compression_report
from dg_quant.registry import create_adapter

EVAL_SPLITS_PREFERRED = ("train", "id_val", "val", "test", "id_test")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here; use --device cpu")
    return torch.device(name)


def make_optimizer(config: argparse.Namespace):
    def build(model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        if config.optimizer == "sgd":
            return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        if config.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)

    return build


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, list | tuple):
        return type(x)(to_device(v, device) for v in x)
    return x


class Run:
    """Holds the pieces of one run so that training, evaluation and checkpoints share them."""

    def __init__(self, config: argparse.Namespace, host: PluginHost) -> None:
        import_wilds()
        from wilds.common.data_loaders import get_eval_loader, get_train_loader
        from wilds.common.grouper import CombinatorialGrouper

        self.config, self.host = config, host
        self.device = resolve_device(config.device)
        self.log_dir = Path(config.log_dir)
        seed_everything(config.seed)
        self.dataset = load_dataset(config)
        self.grouper = CombinatorialGrouper(self.dataset, list(config.groupby_fields))
        self.model = create_adapter(config.model, num_classes=self.dataset.n_classes, weights=config.weights)
        transform = getattr(self.model, "transform", None)
        self.train_data = self.dataset.get_subset("train", frac=config.frac, transform=transform)
        if len(self.train_data) < config.batch_size:
            raise ConfigError(
                f"the train split has {len(self.train_data)} examples, fewer than --batch_size {config.batch_size}; "
                "lower --batch_size"
            )
        self._get_train_loader = get_train_loader
        self.eval_loaders = {
            split: get_eval_loader("standard", self.dataset.get_subset(split, frac=config.frac, transform=transform),
                                   batch_size=config.eval_batch_size or 2 * config.batch_size,
                                   num_workers=config.num_workers)
            for split in self._eval_splits()
        }
        steps_per_epoch = len(self.train_data) // config.batch_size
        config.total_steps = config.n_steps if config.n_steps else config.n_epochs * steps_per_epoch
        config.steps_per_epoch = steps_per_epoch
        config.eval_every = config.eval_every or max(config.total_steps // 5, 1)
        host.configure(config)
        self.model.to(self.device)
        loss = nn.CrossEntropyLoss()
        self.trainer = Trainer.build(host, self.model, config, make_optimizer(config), loss)
        self.records: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None

    def _eval_splits(self) -> list[str]:
        requested = self.config.eval_splits
        available = [s for s in EVAL_SPLITS_PREFERRED if s in self.dataset.split_dict]
        available += [s for s in self.dataset.split_dict if s not in available]
        if requested:
            unknown = [s for s in requested if s not in self.dataset.split_dict]
            if unknown:
                raise ConfigError(f"unknown split(s) {', '.join(unknown)}; this dataset has {', '.join(available)}")
            return list(requested)
        present = [s for s in available if (self.dataset.split_array == self.dataset.split_dict[s]).any()]
        return [s for s in present if s != "train"]

    # -- data order -------------------------------------------------------------------------

    def _epoch_batches(self, epoch: int) -> Iterator[tuple]:
        """Batches of one epoch; the order is a function of (seed, epoch) only, so resume can replay it."""
        seed_everything(self.config.seed * 100_003 + epoch)
        loader = self._get_train_loader(
            "standard", self.train_data, batch_size=self.config.batch_size, num_workers=self.config.num_workers,
            drop_last=True,
        )
        return iter(loader)

    def batches(self, start_step: int, resume_rng: dict | None) -> Iterator[tuple]:
        spe = self.config.steps_per_epoch
        epoch, skip = divmod(start_step, spe)
        while True:
            it = self._epoch_batches(epoch)
            for _ in range(skip):
                next(it)
            if resume_rng is not None:
                set_rng_state(resume_rng)
                resume_rng = None
            skip = 0
            for x, y, _meta in it:
                yield to_device(x, self.device), y.to(self.device, non_blocking=True)
            epoch += 1

    # -- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        model = self.model
        was_training = model.training
        model.eval()
        record: dict[str, Any] = {}
        for split, loader in self.eval_loaders.items():
            preds, ys, metas = [], [], []
            for x, y, meta in loader:
                preds.append(model(to_device(x, self.device)).argmax(dim=1).cpu())
                ys.append(y)
                metas.append(meta)
            results, _ = self.dataset.eval(torch.cat(preds), torch.cat(ys), torch.cat(metas))
            record.update({f"{split}/{k}": _to_float(v) for k, v in _drop_empty_groups(results).items()})
        record.update({k: _to_float(v) for k, v in self.trainer.evaluation_extras().items()})
        model.train(was_training)
        return record

    # -- checkpoints ------------------------------------------------------------------------

    def _checkpoint(self) -> dict[str, Any]:
        return {"trainer": self.trainer.state_dict(), "rng": rng_state(), "records": self.records,
                "best": self.best, "config": _jsonable(vars(self.config))}

    def save_checkpoint(self) -> None:
        atomic_torch_save(self.log_dir / "last.pt", self._checkpoint())
        atomic_write_jsonl(self.log_dir / "results.jsonl", self.records)

    def load_checkpoint(self) -> dict | None:
        path = self.log_dir / "last.pt"
        if not path.exists():
            return None
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
            self.trainer.load_state_dict(state["trainer"])
        except Exception as exc:  # a truncated or foreign file
            raise CheckpointError(
                f"cannot resume from {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                "delete it to start over"
            ) from None
        self.records, self.best = state["records"], state["best"]
        return state["rng"]

    # -- the run ----------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        config, trainer = self.config, self.trainer
        self.log_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.log_dir / "config.json", _jsonable(vars(config)))
        resume_rng = self.load_checkpoint() if config.resume else None
        total = config.total_steps
        window: list[dict[str, Any]] = []
        bar = tqdm(total=total, initial=trainer.step, desc="train", unit="step", disable=config.no_progress,
                   dynamic_ncols=True, file=sys.stderr)
        batches = self.batches(trainer.step, resume_rng)
        while trainer.step < total:
            metrics = trainer.train_step(next(batches))
            window.append(metrics)
            bar.update(1)
            if trainer.step % config.eval_every == 0 or trainer.step == total:
                self._log_eval(window)
                window = []
                bar.set_postfix({k: f"{v:.3f}" for k, v in self.records[-1].items()
                                 if k in ("train/loss", config.val_metric)})
        bar.close()
        return self._finish()

    def _log_eval(self, window: list[dict[str, Any]]) -> None:
        config = self.config
        losses = [scalar_metrics(m) for m in window]
        record: dict[str, Any] = {"step": self.trainer.step, "epoch": self.trainer.step / config.steps_per_epoch}
        for key in losses[0] if losses else []:
            record[f"train/{key}"] = float(np.mean([m[key] for m in losses if key in m]))
        record.update(self.evaluate())
        self.records.append(record)
        if config.val_metric not in record:
            raise ConfigError(
                f"--val_metric {config.val_metric!r} is not among the evaluated metrics; "
                f"e.g. {', '.join(k for k in record if k.endswith('acc_avg'))}"
            )
        if self.best is None or record[config.val_metric] > self.best[config.val_metric]:
            self.best = record
            atomic_torch_save(self.log_dir / "best_model.pt", self._model_file())
        self.save_checkpoint()

    def _model_file(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "step": self.trainer.step, "backbone": self.config.model,
                "num_classes": self.dataset.n_classes, "config": _jsonable(vars(self.config))}

    def _finish(self) -> dict[str, Any]:
        extras = self.trainer.finish(str(self.log_dir))
        report = compression_report(self.model)
        atomic_torch_save(self.log_dir / "model.pt", self._model_file())
        final = {
            "dataset": self.config.dataset,
            "plugins": list(self.config.plugins),
            "model": self.config.model,
            "seed": self.config.seed,
            "val_metric": self.config.val_metric,
            "steps": self.trainer.step,
            "last": self.records[-1],
            "best": self.best,
            "compression": report.to_dict(),
            **{k: _to_float(v) for k, v in extras.items()},
        }
        atomic_write_json(self.log_dir / "final.json", final)
        return final


def _drop_empty_groups(results: dict[str, Any]) -> dict[str, Any]:
    """Remove ``acc_<group>``/``count_<group>`` pairs of groups absent from the split (WILDS reports 0)."""
    empty = {k.split("count_", 1)[1] for k, v in results.items() if k.startswith("count_") and not v}
    return {k: v for k, v in results.items() if not (":" in k and k.split("_", 1)[1] in empty)}


def _to_float(value: Any) -> Any:
    if isinstance(value, torch.Tensor | np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v if _json_ok(v) else str(v) for k, v in values.items()}


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def check_log_dir(config: argparse.Namespace) -> None:
    """Refuse to overwrite an earlier run's results unless resuming it."""
    log_dir = Path(config.log_dir)
    earlier = [n for n in ("last.pt", "final.json") if (log_dir / n).exists()]
    if earlier and not config.resume:
        raise ConfigError(
            f"--log_dir {log_dir} already holds a run ({', '.join(earlier)}); pass --resume to continue it "
            "or choose another --log_dir"
        )


def run(config: argparse.Namespace, host: PluginHost) -> dict[str, Any]:
    """Train and evaluate as ``config`` says; returns what ``final.json`` holds."""
    check_log_dir(config)
    os.makedirs(config.log_dir, exist_ok=True)
    return Run(config, host).fit()
