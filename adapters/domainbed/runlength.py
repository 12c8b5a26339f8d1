"""How long a DomainBed run is and where it checkpoints, which DomainBed never tells its algorithms.

``train.py`` runs ``args.steps or dataset.N_STEPS`` steps and hands the algorithm only its
hparams, yet INQ spreads its partitions over the run and QT-DoG's switch step is a fraction of
it. The length is read the way ``train.py`` reads it: its ``--steps`` and ``--dataset`` flags
from the command line (the launcher runs ``train.py`` with its flags in ``sys.argv``, and a
user's own copy of ``train.py`` keeps them), then the dataset class's ``N_STEPS``.
``register(total_steps=...)`` overrides it for scripts with other flags. The checkpoint steps
(``--checkpoint_freq``, else ``CHECKPOINT_FREQ``) and the data flags (``--data_dir``,
``--test_envs``, ...) are read the same way, for SWAD's validation loss (``evaluation``).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TRAIN_DEFAULT_DATASET = "RotatedMNIST"  # train.py's --dataset default


@dataclass(frozen=True)
class TrainFlags:
    """The flags of ``train.py`` that an algorithm needs (None: not on the command line; the
    split flags default as in ``train.py``)."""

    steps: int | None = None
    dataset: str | None = None
    checkpoint_freq: int | None = None
    data_dir: str | None = None
    test_envs: tuple[int, ...] = (0,)
    holdout_fraction: float = 0.2
    trial_seed: int = 0
    seed: int = 0

    def split_args(self) -> dict[str, Any]:
        """The run's ``args`` as ``train.py`` splits its data with them (``finish.RunData``)."""
        return {
            "dataset": self.dataset or TRAIN_DEFAULT_DATASET,
            "data_dir": self.data_dir,
            "test_envs": list(self.test_envs),
            "holdout_fraction": self.holdout_fraction,
            "trial_seed": self.trial_seed,
            "seed": self.seed,
        }


def train_flags(argv: Sequence[str]) -> TrainFlags:
    """``train.py``'s flags of ``TrainFlags`` as it would parse them; other flags are ignored."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--checkpoint_freq", type=int, default=None)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--test_envs", type=int, nargs="+", default=[0])
    parser.add_argument("--holdout_fraction", type=float, default=0.2)
    parser.add_argument("--trial_seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    try:
        known, _ = parser.parse_known_args(list(argv))
    except SystemExit:  # a malformed value: train.py itself reports it
        return TrainFlags()
    return TrainFlags(**{**vars(known), "test_envs": tuple(known.test_envs)})


def dataset_steps(dataset: str, package: str = "domainbed", attribute: str = "N_STEPS") -> int | None:
    """The dataset class's default run length (``N_STEPS``; or another class ``attribute``), None if unknown."""
    try:
        datasets = importlib.import_module(f"{package}.datasets")
        steps = getattr(datasets.get_dataset_class(dataset), attribute, None)
    except (ImportError, NotImplementedError, KeyError, AttributeError):
        return None
    return int(steps) if steps else None


def run_length(argv: Sequence[str], dataset: str | None = None, package: str = "domainbed") -> int | None:
    """``train.py``'s ``n_steps`` for a command line ``argv`` (``--steps``, else ``N_STEPS`` of
    ``dataset`` or of ``--dataset``, else of train.py's default dataset); None when unknown."""
    flags = train_flags(argv)
    if flags.steps:
        return flags.steps
    return dataset_steps(dataset or flags.dataset or TRAIN_DEFAULT_DATASET, package)


def checkpoint_every(argv: Sequence[str], dataset: str | None = None, package: str = "domainbed") -> int | None:
    """``train.py``'s ``checkpoint_freq`` (``--checkpoint_freq``, else the dataset's
    ``CHECKPOINT_FREQ``); None when unknown. It evaluates at each multiple of it and at the last step."""
    flags = train_flags(argv)
    if flags.checkpoint_freq:
        return flags.checkpoint_freq
    return dataset_steps(dataset or flags.dataset or TRAIN_DEFAULT_DATASET, package, "CHECKPOINT_FREQ")
