"""Dataset lookup for ``wilds_run``: the embedded default, or a dataset of the ``wilds`` package."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from dg_quant.adapters.wilds.compat import import_wilds
from dg_quant.errors import DataError

DEFAULT_DATASET = "rotated_digits"


def _rotated_digits(config: argparse.Namespace):
    from dg_quant.adapters.wilds.digits import RotatedDigitsDataset

    return RotatedDigitsDataset(
        test_domains=config.test_domain, holdout_fraction=config.holdout_fraction, seed=config.split_seed
    )


# Datasets that dg-quant builds itself (no WILDS download); everything else goes to wilds.get_dataset.
LOCAL_DATASETS: dict[str, Callable[[argparse.Namespace], object]] = {
    "rotated_digits": _rotated_digits,
}


def known_datasets() -> list[str]:
    wilds = import_wilds()
    return sorted(set(LOCAL_DATASETS) | set(wilds.supported_datasets))


def load_dataset(config: argparse.Namespace):
    """Build the dataset named by ``config.dataset``; one-line errors for unknown names and paths."""
    name = config.dataset
    if name in LOCAL_DATASETS:
        return LOCAL_DATASETS[name](config)
    wilds = import_wilds()
    if name not in wilds.supported_datasets:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(known_datasets())}")
    if not config.download and not os.path.isdir(config.root_dir):
        raise DataError(
            f"--root_dir {config.root_dir!r} does not exist; point it at the folder holding {name}'s data "
            "(or pass --download to fetch it)"
        )
    kwargs = {"split_scheme": config.split_scheme} if config.split_scheme else {}
    try:
        return wilds.get_dataset(dataset=name, root_dir=config.root_dir, download=config.download, **kwargs)
    except FileNotFoundError as exc:
        raise DataError(
            f"{name} data not found under {config.root_dir!r} ({exc}); check --root_dir or pass --download"
        ) from None
