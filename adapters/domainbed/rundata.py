"""A DomainBed run's data as ``train.py`` splits it, for the work dg-quant adds to a run.

``train.py`` hands an algorithm minibatches only, yet post-training quantization needs
calibration images (``finish``) and SWAD its in-domain validation loss and training batches for
BatchNorm (``evaluation``). ``RunData`` rebuilds the dataset from the run's ``args`` and splits each
environment exactly as ``train.py`` does (``misc.split_dataset`` seeded by ``trial_seed``), so the
training environments' in-splits are the images the run trains on and their out-splits its
in-domain validation data; the test environments are never touched. Datasets are built on first
use, once per transform.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any

from torch.utils.data import ConcatDataset, Dataset

from dg_quant.errors import ConfigError


class RunData:
    """The training environments' splits of one run (``args``: ``train.py``'s, as a mapping)."""

    def __init__(self, args: Mapping[str, Any], hparams: Mapping[str, Any], package: str = "domainbed") -> None:
        self.args, self.hparams, self.package = dict(args), dict(hparams), package
        self._splits: dict[bool, list[tuple[Dataset, Dataset]]] = {}
        self.workers = 0

    def splits(self, augment: bool) -> list[tuple[Dataset, Dataset]]:
        """``(in_split, out_split)`` of each training environment, in environment order.

        ``augment``: the run's own transform (DomainBed augments training environments when
        ``data_augmentation`` is on); else the evaluation transform for every image.
        """
        if augment not in self._splits:
            args = self.args
            if args.get("data_dir") is None:
                raise ConfigError(
                    f"dg-quant needs the run's data (train.py's --data_dir) to rebuild {args.get('dataset')}'s "
                    "splits; run train.py with --data_dir"
                )
            datasets = importlib.import_module(f"{self.package}.datasets")
            misc = importlib.import_module(f"{self.package}.lib.misc")
            hparams = {**self.hparams, "data_augmentation": augment and self.hparams.get("data_augmentation", True)}
            test_envs = list(args["test_envs"])
            dataset = datasets.get_dataset_class(args["dataset"])(args["data_dir"], test_envs, hparams)
            splits = []
            for env_i, env in enumerate(dataset):
                if env_i in test_envs:
                    continue
                out, in_ = misc.split_dataset(
                    env, int(len(env) * args["holdout_fraction"]), misc.seed_hash(args["trial_seed"], env_i)
                )
                splits.append((in_, out))
            self._splits[augment] = splits
            # DomainBed's N_WORKERS (8), but no more than this machine has cores for.
            self.workers = min(int(getattr(dataset, "N_WORKERS", 0)), os.cpu_count() or 1)
        return self._splits[augment]

    def training(self, augment: bool) -> Dataset:
        """The training environments' in-splits, concatenated."""
        return ConcatDataset([in_ for in_, _ in self.splits(augment)])

    def validation(self) -> list[Dataset]:
        """The training environments' out-splits (in-domain validation), without augmentation."""
        return [out for _, out in self.splits(False)]
