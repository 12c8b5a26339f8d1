"""One ``wilds_run`` training run: data, model, the hook-driven loop, evaluation and results.

Results in ``log_dir`` (each written atomically, so a killed run never leaves a torn file):

- ``config.json``: every setting of the run;
- ``results.jsonl``: one record per evaluation, flat keys ``<split>/<metric>``;
- ``last.pt``: the state to ``--resume`` from (model, optimizer, quantizers, RNG, records);
- ``best_model.pt``, ``model.pt``: weights at the best ``val_metric`` and at the end;
- ``final.json``: last-step and best-validation metrics, ``test_metric`` at both (model selection
  by training-domain or WILDS validation), plus the compression report.

``--resume`` continues from ``last.pt`` and gives the same numbers as an uninterrupted run: the
data order is a function of (seed, epoch) only and the RNG state is restored mid-epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dg_quant.adapters.wilds import distributed
from dg_quant.adapters.wilds.calibration import TrainingCalibration
from dg_quant.adapters.wilds.datasets import SubsetSpec, load_dataset
from dg_quant.adapters.wilds.input_checks import guard_inputs, worker_message
from dg_quant.adapters.wilds.loggers import RecordLoggers
from dg_quant.adapters.wilds.run_folder import RunFolder, check_resume_settings
from dg_quant.adapters.wilds.run_model import build_run_model
from dg_quant.adapters.wilds.run_results import load_final
from dg_quant.adapters.wilds.stopping import StopRequest, Terminated, check_finite
from dg_quant.adapters.wilds.transforms import build_transforms
from dg_quant.adapters.wilds_compat import import_wilds
from dg_quant.context import RunContext
from dg_quant.errors import CheckpointError, ConfigError, DataError, TrainingError
from dg_quant.hookimpl import hookimpl
from dg_quant.host import PluginHost
from dg_quant.io import atomic_torch_save, atomic_write_json, atomic_write_jsonl, load_torch_file
from dg_quant.loop import Trainer, scalar_metrics
from dg_quant.progress import progress_bar
from dg_quant.quant import compression_report
from dg_quant.selection import SELECTION_RULE, replaces_selected

EVAL_SPLITS_PREFERRED = ("train", "id_val", "val", "test", "id_test")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def host_rng_state() -> dict[str, Any]:
    """The RNGs that decide the data order (CPU side; each GPU's generator belongs to its process)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def rng_state() -> dict[str, Any]:
    return {**host_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


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


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """WILDS' AdamW groups: no weight decay on biases and LayerNorm weights."""
    norm = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("bias") or id(p) in norm else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(config: argparse.Namespace):
    def build(model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        if config.optimizer == "sgd":
            return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        if config.optimizer == "adamw":
            return torch.optim.AdamW(decay_groups(model, config.weight_decay), lr=config.lr)
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)

    return build


def make_scheduler(config: argparse.Namespace, total_steps: int):
    """``linear``: the WILDS/transformers linear decay to 0 over the run, without warmup."""
    if config.scheduler in (None, "none"):
        return None
    total = max(int(total_steps), 1)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, (total - step) / total))


class ClipGradients:
    """Host-side gradient clipping (``--max_grad_norm``), after every plugin's backward work."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm

    @hookimpl(trylast=True)
    def dgq_after_backward(self, model: nn.Module) -> None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], self.max_norm)


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, list | tuple):
        return type(x)(to_device(v, device) for v in x)
    return x


HOST = "wilds_run"


def run_context(config: argparse.Namespace, steps_per_epoch: int, plugins: list[str]) -> RunContext:
    """The run's length and evaluation interval, worked out from its settings and its data."""
    total = config.n_steps if config.n_steps else config.n_epochs * steps_per_epoch
    # WILDS evaluates once per epoch; a run given in steps evaluates five times.
    eval_every = config.eval_every or (steps_per_epoch if not config.n_steps else max(total // 5, 1))
    return RunContext(
        host=HOST,
        dataset=config.dataset,
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
        eval_every=eval_every,
        log_dir=str(config.log_dir),
        plugins=tuple(plugins),
    )


def saved_settings(config: argparse.Namespace, context: RunContext) -> dict[str, Any]:
    """The settings a run saves (``config.json``, checkpoints, model files): the flags, with the
    run length, epoch length, evaluation interval and plugins filled in from its context, which
    is what ``dgq_export``/``dgq_ptq`` rebuild the run from."""
    return _jsonable(
        vars(config)
        | {
            "eval_every": context.eval_every,
            "plugins": list(context.plugins),
            "steps_per_epoch": context.steps_per_epoch,
            "total_steps": context.total_steps,
        }
    )


class Run:
    """Holds the pieces of one run so that training, evaluation and checkpoints share them."""

    def __init__(
        self, config: argparse.Namespace, host: PluginHost, procs: distributed.Processes | None = None
    ) -> None:
        import_wilds()
        from wilds.common.data_loaders import get_eval_loader, get_train_loader
        from wilds.common.grouper import CombinatorialGrouper

        self.config, self.host = config, host
        self.procs = procs or distributed.Processes()  # torchrun: this process's rank (distributed.py)
        self.device = distributed.local_device(resolve_device(config.device), self.procs)
        self.log_dir = Path(config.log_dir)
        seed_everything(config.seed)
        self.dataset = load_dataset(config)
        guard_inputs(self.dataset, config.dataset)  # missing files: one line now, not at the first evaluation
        unknown = [f for f in config.groupby_fields if f not in self.dataset.metadata_fields]
        if unknown:
            raise ConfigError(
                f"--groupby_fields {' '.join(unknown)}: not metadata of {config.dataset}; "
                f"choose from {', '.join(self.dataset.metadata_fields)}"
            )
        self.grouper = CombinatorialGrouper(self.dataset, list(config.groupby_fields))
        self.model = self._build_model()
        train_transform, eval_transform = build_transforms(config.transform, config.image_size, self.model)
        subsets = SubsetSpec.of(config)
        self.train_data = subsets.subset(self.dataset, "train", train_transform)
        if len(self.train_data) < config.batch_size:
            raise ConfigError(
                f"the train split has {len(self.train_data)} examples, fewer than --batch_size {config.batch_size}; "
                "lower --batch_size"
            )
        distributed.check_batch_size(config.batch_size, self.procs)
        check_batch_size = getattr(self.dataset, "check_batch_size", None)
        if check_batch_size is not None:
            check_batch_size(config.batch_size)
        if config.train_loader == "group":
            self._check_group_count()
        self._get_train_loader = get_train_loader
        steps_per_epoch = len(self._train_loader())
        self.eval_loaders = {
            split: get_eval_loader(
                "standard",
                subsets.subset(self.dataset, split, eval_transform),
                batch_size=config.eval_batch_size or 2 * config.batch_size,
                num_workers=config.num_workers,
            )
            for split in self._eval_splits()
        }
        self._check_selection_split()
        self.context = host.configure(config, run_context(config, steps_per_epoch, host.names))
        if config.max_grad_norm:
            host.register(ClipGradients(config.max_grad_norm), name="wilds_run.clip_grad_norm")
        self.model.to(self.device)
        loss = nn.CrossEntropyLoss()
        scheduler = make_scheduler(config, self.context.total_steps)
        self.trainer = Trainer.build(host, self.model, config, make_optimizer(config), loss, scheduler)
        self.trainer.forward_model = distributed.data_parallel(self.model, self.procs, self.device)
        self.records: list[dict[str, Any]] = []
        self.loggers = RecordLoggers(getattr(config, "logger", None), self.log_dir)
        self.best: dict[str, Any] | None = None
        self.saved_step = 0
        self.resumed_window: list[dict[str, Any]] = []
        self.resumed_pending_eval = False
        self.stop = StopRequest()

    def _build_model(self) -> nn.Module:
        """The backbone, built as every later rebuild of this run builds it (``run_model``)."""
        return build_run_model(self.config, self.dataset.n_classes)

    def _train_loader(self):
        """A fresh WILDS training loader (standard or group); its order follows the global RNG."""
        config = self.config
        common = {
            "batch_size": config.batch_size,
            "num_workers": config.num_workers,
            "uniform_over_groups": config.uniform_over_groups,
            "grouper": self.grouper,
        }
        try:
            if config.train_loader == "group":
                loader = self._get_train_loader(
                    "group", self.train_data, n_groups_per_batch=config.n_groups_per_batch, **common
                )
            else:
                loader = self._get_train_loader("standard", self.train_data, drop_last=True, **common)
            return distributed.shard_loader(loader, self.procs)  # this process's share of each batch
        except ValueError as exc:  # batch not divisible by groups, too few groups
            raise ConfigError(f"--train_loader {config.train_loader}: {exc}") from None

    def _check_group_count(self) -> None:
        """WILDS' group loader draws ``n_groups_per_batch`` distinct groups of the train split."""
        groups = self.grouper.metadata_to_group(self.train_data.metadata_array).unique()
        if self.config.n_groups_per_batch > len(groups):
            raise ConfigError(
                f"--n_groups_per_batch {self.config.n_groups_per_batch}: the train split has only {len(groups)} "
                f"groups of {'+'.join(self.config.groupby_fields)}; lower it"
            )

    def _check_selection_split(self) -> None:
        """``--val_metric`` must read a split that is evaluated: found at start-up, not after training."""
        metric = str(self.config.val_metric)
        split = metric.split("/", 1)[0]
        if split != "train" and split not in self.eval_loaders:
            evaluated = " ".join(self.eval_loaders) or "none"
            raise ConfigError(
                f"--val_metric {metric!r} reads split {split!r}, which is not evaluated (--eval_splits: {evaluated}); "
                f"add {split} to --eval_splits or choose --val_metric on an evaluated split"
            )

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

    def _epoch_batches(self, epoch: int, skip: int = 0) -> Iterator[tuple]:
        """Batches of one epoch after its first ``skip``; the order is a function of (seed, epoch) only."""
        seed_everything(self.config.seed * 100_003 + epoch)
        it = iter(self._train_loader())
        fast = self.config.num_workers == 0 and hasattr(it, "_next_index")
        for _ in range(skip):
            # in-process loading: draw the skipped indices without reading their inputs (the RNG
            # state is restored right after); worker processes must really load to stay in step
            it._next_index() if fast else next(it)
        return it

    def batches(self, start_step: int, resume_rng: dict | None) -> Iterator[tuple]:
        """Training batches ``(x, y, domains)`` from ``start_step`` on, exactly as an uninterrupted run
        would see them; ``domains`` are the grouper's groups (``--groupby_fields``) of the samples."""
        spe = self.context.steps_per_epoch
        epoch, skip = divmod(start_step, spe)
        while True:
            it = self._epoch_batches(epoch, skip)
            if resume_rng is not None and skip:
                # mid-epoch: continue with the RNG of the interrupted run; at an epoch boundary
                # the uninterrupted run re-seeds, as _epoch_batches just did
                set_rng_state(resume_rng)
            resume_rng = None
            skip = 0
            for x, y, meta in it:
                domains = self.grouper.metadata_to_group(meta).to(self.device, non_blocking=True)
                yield to_device(x, self.device), y.to(self.device, non_blocking=True), domains
            epoch += 1

    def train_inputs(self, n: int) -> Iterator[Any]:
        """Up to ``n`` training input batches (train transform, shuffled), for BatchNorm re-estimation
        of an averaged model (``dgq_final_model``); cycles through the split if it has fewer."""
        done = 0
        while done < n:
            for x, _y, _meta in self._train_loader():
                yield to_device(x, self.device)
                done += 1
                if done >= n:
                    return

    # -- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        model = self.model
        was_training = model.training
        model.eval()
        record: dict[str, Any] = {}
        bar = progress_bar(
            sum(len(loader) for loader in self.eval_loaders.values()),
            "eval",
            "batch",
            disable=self.config.no_progress,
            leave=False,
        )
        for split, loader in self.eval_loaders.items():
            bar.set_postfix_str(split, refresh=False)
            preds, ys, metas = [], [], []
            loss_sum = 0.0
            for x, y, meta in loader:
                with self.trainer.autocast():
                    logits = model(to_device(x, self.device))
                loss_sum += _summed_cross_entropy(logits, y)
                preds.append(logits.argmax(dim=1).cpu())
                ys.append(y)
                metas.append(meta)
                bar.update(1)
            results, _ = self.dataset.eval(torch.cat(preds), torch.cat(ys), torch.cat(metas))
            results = (
                _drop_empty_groups(results)
                if self.config.group_logging is not False
                else {k: v for k, v in results.items() if ":" not in k}
            )
            record.update({f"{split}/{k}": _metric_value(k, v) for k, v in results.items()})
            if not math.isnan(loss_sum) and split != "train":  # train/loss is the training steps' mean
                record[f"{split}/loss"] = loss_sum / max(sum(len(t) for t in ys), 1)
        bar.close()
        record.update({k: _to_float(v) for k, v in self.trainer.evaluation_extras().items()})
        model.train(was_training)
        return record

    # -- checkpoints ------------------------------------------------------------------------

    def _checkpoint(
        self, window: list[dict[str, Any]], rng: dict[str, Any] | None, pending_eval: bool
    ) -> dict[str, Any]:
        # window: the step metrics since the last evaluation (a --save_every checkpoint falls
        # between evaluations); pending_eval: the evaluation at this step has yet to run
        return {
            "trainer": self.trainer.state_dict(),
            "rng": rng or rng_state(),
            "records": self.records,
            "best": self.best,
            "config": saved_settings(self.config, self.context),
            "window": [scalar_metrics(m) for m in window],
            "pending_eval": pending_eval,
        }

    def save_checkpoint(
        self, window: list[dict[str, Any]] = (), rng: dict[str, Any] | None = None, pending_eval: bool = False
    ) -> None:
        """``last.pt`` (and ``results.jsonl``) at the current step, refused if training went non-finite."""
        self._check_finite(window)
        atomic_torch_save(self.log_dir / "last.pt", self._checkpoint(list(window), rng, pending_eval))
        self._write_results()
        self.saved_step = self.trainer.step

    def _check_finite(self, window: list[dict[str, Any]]) -> None:
        """Stop a run whose loss or weights went NaN/inf, naming the checkpoint that is kept."""
        try:
            check_finite(window, self.model, self.trainer.step - len(window))
        except TrainingError as exc:
            kept = self.log_dir / "last.pt"
            where = (
                f"the last good checkpoint {kept} (step {self.saved_step}) is kept"
                if kept.is_file()
                else "no checkpoint was written"
            )
            raise TrainingError(
                f"{exc}; {where}; lower --lr or set --max_grad_norm and start again in another --log_dir"
            ) from None

    def _write_results(self) -> None:
        """``results.jsonl`` and the ``--logger`` sinks (TensorBoard, CSV) get the same records."""
        atomic_write_jsonl(self.log_dir / "results.jsonl", self.records)
        self.loggers.write(self.records)

    def load_checkpoint(self) -> dict | None:
        """Restore ``last.pt`` (checksums verified, settings compared first); its RNG state, or None."""
        path = self.log_dir / "last.pt"
        if not path.exists():
            return None
        state = load_torch_file(path, map_location=self.device)
        if not isinstance(state, dict) or not {"trainer", "rng", "records", "best"} <= state.keys():
            raise CheckpointError(f"{path} is not a wilds_run checkpoint; choose another --log_dir")
        check_resume_settings(state.get("config", {}), saved_settings(self.config, self.context), path)
        try:
            self.trainer.load_state_dict(state["trainer"])
        except Exception as exc:  # settings equal, yet the state does not fit: another dg-quant version?
            raise CheckpointError(
                f"{path} does not fit this run's model ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); was it written by another dg-quant version?"
            ) from None
        self.records, self.best = state["records"], state["best"]
        self.saved_step = self.trainer.step
        self.resumed_window = state.get("window") or []
        self.resumed_pending_eval = bool(state.get("pending_eval"))
        return state["rng"]

    # -- the run ----------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        config, trainer = self.config, self.trainer
        resume_rng = self.load_checkpoint() if config.resume else None
        if self.procs.is_main and not (config.resume and (self.log_dir / "config.json").is_file()):
            atomic_write_json(self.log_dir / "config.json", saved_settings(config, self.context))
        total, eval_every = self.context.total_steps, self.context.eval_every
        if config.resume and trainer.step >= total and (self.log_dir / "final.json").is_file():
            return load_final(self.log_dir)  # finished: the end-of-training hooks ran already
        window: list[dict[str, Any]] = list(self.resumed_window)
        if self.resumed_pending_eval:  # stopped during this step's evaluation: run it first
            set_rng_state(resume_rng)
            self._log_eval_on_rank0(window)
            window, resume_rng = [], rng_state()
        save_every = getattr(config, "save_every", None) or 0
        main = self.procs.is_main
        bar = progress_bar(total, "train", "step", initial=trainer.step, disable=config.no_progress or not main)
        batches = self.batches(trainer.step, resume_rng)
        while trainer.step < total:
            x, y, domains = next(batches)
            metrics = trainer.train_step((x, y), domains=domains)
            window.append(metrics)
            bar.update(1)
            distributed.share_torch_rng(self.procs, self.device)
            stopping = distributed.any_rank(self.stop.requested, self.procs, self.device)
            evaluating = trainer.step % eval_every == 0 or trainer.step == total
            if evaluating or (save_every and trainer.step % save_every == 0) or stopping:
                window = distributed.average_metrics(window, self.procs, self.device)  # each process: its share
            if evaluating:
                self._log_eval_on_rank0(window)
                window = []
                bar.set_postfix(
                    {k: f"{v:.3f}" for k, v in self.records[-1].items() if k in ("train/loss", config.val_metric)}
                    if main
                    else {},
                    refresh=False,
                )
            elif main and ((save_every and trainer.step % save_every == 0) or stopping):
                self.save_checkpoint(window)
            if stopping:
                raise Terminated(trainer.step)
        bar.close()
        return self._finish() if main else {}

    def _log_eval_on_rank0(self, window: list[dict[str, Any]]) -> None:
        """``_log_eval`` on rank 0 alone; under torchrun every process first checks it holds the same
        state, and afterwards takes rank 0's RNG (its evaluation loaders drew from it)."""
        if self.procs.parallel:
            distributed.follow_rank0_buffers(self.model, self.procs)
            state = {**self.trainer.state_dict(), "rng": host_rng_state()}
            distributed.check_in_step(state, self.procs, self.trainer.step)
        if self.procs.is_main:
            self._log_eval(window)
        if self.procs.parallel:
            set_rng_state({**distributed.follow_rank0(host_rng_state(), self.procs), "cuda": []})

    def _log_eval(self, window: list[dict[str, Any]]) -> None:
        config = self.config
        losses = [scalar_metrics(m) for m in window]
        record: dict[str, Any] = {
            "step": self.trainer.step,
            "epoch": epoch_of(self.trainer.step, self.context.steps_per_epoch),
        }
        for key in losses[0] if losses else []:
            record[f"train/{key}"] = float(np.mean([m[key] for m in losses if key in m]))
        self._check_finite(window)  # before the model is evaluated or saved as the best
        before = rng_state()
        try:
            with self.stop.interrupting(self.trainer.step):
                record.update(self.evaluate())
        except (DataError, Terminated):
            # keep the training done so far: a resumed run redoes this evaluation first
            self.save_checkpoint(window, rng=before, pending_eval=True)
            raise
        self.records.append(record)
        self.trainer.evaluated(record)  # e.g. SWAD's loss valley
        if config.val_metric not in record:
            raise ConfigError(
                f"--val_metric {config.val_metric!r} is not among the evaluated metrics; "
                f"e.g. {', '.join(k for k in record if k.endswith('acc_avg'))}"
            )
        test_split = str(config.test_metric).split("/", 1)[0]
        if test_split in self.eval_loaders and config.test_metric not in record:
            raise ConfigError(
                f"--test_metric {config.test_metric!r} is not among the evaluated metrics; "
                f"e.g. {', '.join(k for k in record if k.startswith(test_split + '/'))}"
            )
        if record[config.val_metric] is None:
            raise ConfigError(f"--val_metric {config.val_metric!r} is undefined (empty split?); choose another")
        if replaces_selected(record, self.best, config.val_metric):  # quantized ones first (selection.py)
            self.best = record
            atomic_torch_save(self.log_dir / "best_model.pt", self._model_file())
        self.save_checkpoint()

    def _model_file(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "step": self.trainer.step,
            "backbone": self.config.model,
            "num_classes": self.dataset.n_classes,
            "config": saved_settings(self.config, self.context),
        }

    def calibration(self) -> TrainingCalibration:
        """The training split (source domains only) with the evaluation transform, for
        post-training calibration at the end of training (the same images as ``dgq_ptq`` uses)."""
        _train, eval_transform = build_transforms(self.config.transform, self.config.image_size, self.model)
        train = SubsetSpec.of(self.config).subset(self.dataset, "train", eval_transform)
        return TrainingCalibration(train, self.device, self.config.seed)

    def _finish(self) -> dict[str, Any]:
        replaced = self.trainer.final_model(self.train_inputs)
        if replaced is not None:
            # A weight average (SWAD, SWA) now stands for the run: it is evaluated, selected and saved.
            record = {"step": self.trainer.step, "epoch": self.records[-1]["epoch"], "phase": "final_model"}
            record.update(self.evaluate())
            self.records.append(record)
            self._write_results()
            self.best = record
            atomic_torch_save(self.log_dir / "best_model.pt", self._model_file())
        end = self.trainer.end(str(self.log_dir), calibration=self.calibration())
        extras = end.numbers
        if end.model_changed:
            # An end-of-training hook changed the model (e.g. post-training quantization):
            # the last record must describe the model that is saved, so evaluate it again.
            record = {"step": self.trainer.step, "epoch": self.records[-1]["epoch"], "phase": "train_end"}
            record.update(self.evaluate())
            self.records.append(record)
            self._write_results()
            if replaces_selected(record, self.best, self.config.val_metric):  # e.g. the PTQ model
                self.best = record
                atomic_torch_save(self.log_dir / "best_model.pt", self._model_file())
        report = compression_report(self.model)
        atomic_torch_save(self.log_dir / "model.pt", self._model_file())
        final = {
            "dataset": self.config.dataset,
            "plugins": list(self.context.plugins),
            "model": self.config.model,
            "seed": self.config.seed,
            "val_metric": self.config.val_metric,
            "test_metric": self.config.test_metric,
            "steps": self.trainer.step,
            # the official metric with training-domain (or WILDS OOD) validation selection, and at the end
            "test_at_best": self.best.get(self.config.test_metric),
            "test_at_last": self.records[-1].get(self.config.test_metric),
            "best_step": self.best["step"],
            "selection": SELECTION_RULE,
            "last": self.records[-1],
            "best": self.best,
            "compression": report.to_dict(),
            **{k: _to_float(v) for k, v in {**(replaced or {}), **extras}.items()},
        }
        atomic_write_json(self.log_dir / "final.json", final)
        return final


def _summed_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Summed cross-entropy of a classification batch (NaN when the task is not single-label
    classification, so no ``<split>/loss`` is recorded)."""
    if logits.dim() != 2 or y.dim() != 1 or y.dtype not in (torch.int64, torch.int32):
        return math.nan
    return float(nn.functional.cross_entropy(logits.float(), y.to(logits.device).long(), reduction="sum"))


def _drop_empty_groups(results: dict[str, Any]) -> dict[str, Any]:
    """Remove ``acc_<group>``/``count_<group>`` pairs of groups absent from the split (WILDS reports 0)."""
    empty = {k.split("count_", 1)[1] for k, v in results.items() if k.startswith("count_") and not v}
    return {k: v for k, v in results.items() if not (":" in k and k.split("_", 1)[1] in empty)}


def epoch_of(step: int, steps_per_epoch: int) -> float:
    """Epochs done after ``step``, to four decimals (``0.033``, not ``0.0330033...``)."""
    return round(step / steps_per_epoch, 4)


def _metric_value(key: str, value: Any) -> Any:
    """A metric as JSON: counts (``count_domain:rot0``) as integers, the rest as floats."""
    value = _to_float(value)
    if key.startswith("count") and isinstance(value, float):
        return int(round(value))
    return value


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
    """Train and evaluate as ``config`` says; returns what ``final.json`` holds.

    The run folder is locked for the whole run (``run_folder.RunFolder``); a folder this call
    created is removed again if the run fails before writing anything into it.
    """
    procs = distributed.from_environment()  # several under torchrun: rank 0 owns the folder
    stop = StopRequest()
    folder = RunFolder(config.log_dir) if procs.is_main else contextlib.nullcontext()
    with stop.installed(), distributed.process_group(procs, resolve_device(config.device)), folder:
        if procs.is_main:
            check_log_dir(config)
        with stop.interrupting(0):  # SIGTERM while the data loads: stop at once, nothing to save
            this_run = Run(config, host, procs)
        this_run.stop = stop
        try:
            return this_run.fit()
        except DataError as exc:  # with --num_workers > 0 its text is the worker's traceback
            raise DataError(worker_message(exc)) from None
        finally:
            # DDP's reducer holds the process group: free it before the group is destroyed (at
            # interpreter exit it aborted the process now and then: "terminate called ...")
            this_run.trainer.forward_model = this_run.model
            if procs.parallel:
                gc.collect()
