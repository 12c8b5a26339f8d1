"""How long a DomainBed run is, which DomainBed never tells its algorithms.

``train.py`` runs ``args.steps or dataset.N_STEPS`` steps and hands the algorithm only its
hparams, yet INQ spreads its partitions over the run and QT-DoG's switch step is a fraction of
it. The length is read the way ``train.py`` reads it: its ``--steps`` and ``--dataset`` flags
from the command line (the launcher runs ``train.py`` with its flags in ``sys.argv``, and a
user's own copy of ``train.py`` keeps them), then the dataset class's ``N_STEPS``.
``register(total_steps=...)`` overrides it for scripts with other flags.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from dataclasses import dataclass

TRAIN_DEFAULT_DATASET = "RotatedMNIST"  # train.py's --dataset default


@dataclass(frozen=True)
class TrainFlags:
    """The flags of ``train.py`` that set the run length (None: not on the command line)."""

    steps: int | None
    dataset: str | None


def train_flags(argv: Sequence[str]) -> TrainFlags:
    """``--steps`` and ``--dataset`` as ``train.py`` would parse them; other flags are ignored."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--dataset", default=None)
    try:
        known, _ = parser.parse_known_args(list(argv))
    except SystemExit:  # a malformed value: train.py itself reports it
        return TrainFlags(None, None)
    return TrainFlags(known.steps, known.dataset)


def dataset_steps(dataset: str, package: str = "domainbed") -> int | None:
    """The dataset class's default run length (``N_STEPS``), None if unknown."""
    try:
        datasets = importlib.import_module(f"{package}.datasets")
        steps = getattr(datasets.get_dataset_class(dataset), "N_STEPS", None)
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
