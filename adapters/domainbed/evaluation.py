"""The evaluations SWAD needs, inside a DomainBed algorithm (DomainBed's ``train.py`` never tells it).

``train.py`` evaluates outside the algorithm, accuracy only, and keeps the losses to itself; a
plugin that reads evaluations (``dgq_evaluated``: SWAD's loss valley) or replaces the trained
model at the end (``dgq_final_model``: SWAD's average) would get neither. So the algorithm does
it itself, on ``train.py``'s schedule, read from ``train.py``'s flags as the run length is
(``runlength``): right after the update of every checkpoint step (``step % checkpoint_freq == 0``
and the last step, where ``train.py`` then evaluates and writes a record), it measures the
in-domain validation loss of the online model and hands it to the plugins as ``id_val/loss``;
after the last update it lets them replace the model (SWAD's averaged weights, BatchNorm
re-estimated on training batches). ``train.py``'s own last evaluation, its last record and its
``model.pkl`` then hold that model, and so does ``predict``.

The loss is SWAD's ``tr_outloss``: the mean over the training environments of each one's mean
cross-entropy on its out-split (``train.py``'s split), with the evaluation transform, in eval
mode, through ``predict``. BatchNorm batches are shuffled training in-split images with the
run's own transform, ``batch_size`` per training environment, as a training step sees them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dg_quant.adapters.domainbed.rundata import RunData
from dg_quant.adapters.domainbed.runlength import TrainFlags
from dg_quant.errors import ConfigError

VAL_LOSS_KEY = "id_val/loss"  # the record key the plugins read (dgq_evaluated)
VAL_LOSS_METRIC = "id_val_loss"  # the same loss in update()'s metrics, hence in results.jsonl
EVAL_BATCH_SIZE = 64  # train.py's evaluation batch size


def reads_evaluations(hook: Any) -> bool:
    """True when a loaded plugin implements ``dgq_evaluated`` or ``dgq_final_model``."""
    return bool(hook.dgq_evaluated.get_hookimpls() or hook.dgq_final_model.get_hookimpls())


class CheckpointEvaluation:
    """``train.py``'s checkpoint schedule and the data to measure a run's validation loss on."""

    def __init__(
        self,
        flags: TrainFlags,
        total_steps: int | None,
        every: int | None,
        hparams: Mapping[str, Any],
        num_domains: int,
        package: str = "domainbed",
    ) -> None:
        self.flags, self.total_steps, self.every = flags, total_steps, every
        self.batch_size = int(hparams.get("batch_size", 32)) * max(1, num_domains)
        self.data = RunData(flags.split_args(), hparams, package)
        self._validation: list[DataLoader] | None = None

    def _check_schedule(self, name: str) -> tuple[int, int]:
        if not self.total_steps or not self.every:
            raise ConfigError(
                f"{name} evaluates at train.py's checkpoints, and this command line gives neither the run length "
                "nor the checkpoint frequency (--steps, --checkpoint_freq, --dataset); run it through train.py's "
                "flags (python -m dg_quant.adapters.domainbed train ...)"
            )
        return self.total_steps, self.every

    def is_checkpoint(self, step: int, name: str) -> bool:
        """Does ``train.py`` evaluate after the update of 0-based ``step``?"""
        total, every = self._check_schedule(name)
        return step % every == 0 or step == total - 1

    def is_last(self, step: int, name: str) -> bool:
        return step == self._check_schedule(name)[0] - 1

    def _loaders(self) -> list[DataLoader]:
        if self._validation is None:
            splits = self.data.validation()
            self._validation = [
                DataLoader(
                    split,
                    batch_size=EVAL_BATCH_SIZE,
                    num_workers=self.data.workers,
                    persistent_workers=self.data.workers > 0,
                )
                for split in splits
            ]
        return self._validation

    @torch.no_grad()
    def validation_loss(self, algorithm: torch.nn.Module, device: torch.device) -> float:
        """SWAD's ``tr_outloss`` of ``algorithm`` (its ``predict``, in eval mode)."""
        was_training = algorithm.training
        algorithm.eval()
        try:
            losses = []
            for loader in self._loaders():
                total, count = 0.0, 0
                for x, y, *_ in loader:
                    logits = algorithm.predict(x.to(device)).float()
                    total += float(F.cross_entropy(logits, y.to(device), reduction="sum"))
                    count += len(y)
                losses.append(total / max(count, 1))
        finally:
            algorithm.train(was_training)
        return sum(losses) / len(losses)

    def train_batches(self, n: int, device: torch.device) -> Iterator[torch.Tensor]:
        """Up to ``n`` shuffled training batches (inputs only, the run's transform), cycling."""
        data = self.data.training(augment=True)
        generator = torch.Generator().manual_seed(self.flags.seed)
        loader = DataLoader(
            data,
            batch_size=min(self.batch_size, len(data)),
            shuffle=True,
            generator=generator,
            num_workers=self.data.workers,
            drop_last=True,
        )
        done = 0
        while done < n:
            for x, *_ in loader:
                yield x.to(device)
                done += 1
                if done >= n:
                    return
