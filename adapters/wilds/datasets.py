"""Dataset lookup for ``wilds_run``: the embedded default, DomainBed-layout image folders, or a
dataset of the ``wilds`` package (Camelyon17, Amazon, ...) read by its own loader."""

from __future__ import annotations

import argparse
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dg_quant.adapters.wilds_compat import import_wilds
from dg_quant.errors import ConfigError, DataError

DEFAULT_DATASET = "rotated_digits"

# --dataset name -> folder under --root_dir (DomainBed's names, after its download script).
FOLDER_DATASETS: dict[str, str] = {
    "pacs": "PACS",
    "vlcs": "VLCS",
    "office_home": "office_home",
    "terra_incognita": "terra_incognita",
    "domain_net": "domain_net",
}
# ("domainnet" is left to WILDS' own DomainNet loader)
ALIASES = {"officehome": "office_home", "terraincognita": "terra_incognita"}
# --root_dir itself holds the domain folders (any DomainBed-layout data set of your own).
CUSTOM_FOLDER = "image_folder"


@dataclass(frozen=True)
class SubsetSpec:
    """Which part of each split a run uses (``--frac``), drawn the same way by every command.

    WILDS' ``get_subset(frac=...)`` samples from numpy's global generator, so the subset depended
    on whatever had drawn before: ``dgq_ptq``, ``dgq_eoq`` and ``dgq_analyze`` scored a run on other
    examples than the run itself. Here the draw is seeded by the split seed and the split's name.
    """

    frac: float = 1.0
    seed: int = 0

    @classmethod
    def of(cls, config: argparse.Namespace) -> SubsetSpec:
        """The subsets of the run whose settings are ``config``."""
        return cls(float(getattr(config, "frac", 1.0)), int(getattr(config, "split_seed", 0)))

    def subset(self, dataset: Any, split: str, transform: Callable | None = None) -> Any:
        """``split`` of ``dataset`` (all of it, or this run's ``frac`` of it) with ``transform``."""
        if self.frac >= 1.0:
            return dataset.get_subset(split, transform=transform)
        saved = np.random.get_state()
        np.random.seed(zlib.crc32(f"{self.seed}:{split}".encode()))
        try:
            return dataset.get_subset(split, frac=self.frac, transform=transform)
        finally:
            np.random.set_state(saved)


FULL_SPLITS = SubsetSpec()


def canonical_name(name: str) -> str | None:
    """The ``FOLDER_DATASETS`` key (or ``image_folder``) for a dataset name, else None."""
    key = ALIASES.get(name.lower(), name.lower())
    return key if key in FOLDER_DATASETS or key == CUSTOM_FOLDER else None


def _rotated_digits(config: argparse.Namespace):
    from dg_quant.adapters.wilds.digits import RotatedDigitsDataset

    return RotatedDigitsDataset(
        test_domains=config.test_domain, holdout_fraction=config.holdout_fraction, seed=config.split_seed
    )


# Datasets that dg-quant builds itself (no WILDS download); everything else goes to wilds.get_dataset.
LOCAL_DATASETS: dict[str, Callable[[argparse.Namespace], object]] = {
    "rotated_digits": _rotated_digits,
}


def _image_folders(config: argparse.Namespace):
    from dg_quant.adapters.wilds.folders import DomainFolderDataset

    return DomainFolderDataset(
        config.root_dir,
        name=canonical_name(config.dataset),
        test_domains=config.test_domain,
        holdout_fraction=config.holdout_fraction,
        seed=config.split_seed,
    )


def known_datasets() -> list[str]:
    wilds = import_wilds()
    return sorted(set(LOCAL_DATASETS) | set(FOLDER_DATASETS) | {CUSTOM_FOLDER} | set(wilds.supported_datasets))


def _missing_release_hint(root_dir: str, name: str) -> str:
    """Why WILDS did not find ``name`` under ``root_dir``: most often a missing RELEASE file."""
    for data_dir in sorted(Path(root_dir).glob(f"{name}_v*")):
        version = data_dir.name.rsplit("_v", 1)[1]
        if data_dir.is_dir() and not (data_dir / f"RELEASE_v{version}.txt").exists():
            return (
                f"{data_dir} has no RELEASE_v{version}.txt, so WILDS takes the dataset as absent; "
                "finish or redo the download (or create that file if the data is complete)"
            )
    return f"{name} data not found under {root_dir!r}; expected {root_dir}/{name}_v<version>/ (or pass --download)"


def load_dataset(config: argparse.Namespace):
    """Build the dataset named by ``config.dataset``; one-line errors for unknown names and paths."""
    name = config.dataset
    if name in LOCAL_DATASETS:
        return LOCAL_DATASETS[name](config)
    if canonical_name(name):
        return _image_folders(config)
    wilds = import_wilds()
    if name not in wilds.supported_datasets:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(known_datasets())}")
    if not config.download and not os.path.isdir(config.root_dir):
        raise DataError(
            f"--root_dir {config.root_dir!r} does not exist; point it at the folder holding {name}'s data "
            "(or pass --download to fetch it)"
        )
    if getattr(config, "test_domain", None):
        raise ConfigError(
            f"--test_domain {config.test_domain}: {name} has WILDS' fixed split (--split_scheme "
            f"{config.split_scheme or 'official'}), whose test domains are not chosen by a flag; drop --test_domain"
        )
    kwargs = {"split_scheme": config.split_scheme} if config.split_scheme else {}
    try:
        return wilds.get_dataset(dataset=name, root_dir=config.root_dir, download=config.download, **kwargs)
    except FileNotFoundError as exc:
        if not config.download and "could not be found" in str(exc):
            raise DataError(_missing_release_hint(config.root_dir, name)) from None
        raise DataError(f"{name} under {config.root_dir!r}: {str(exc).splitlines()[0]}") from None
    except (ValueError, KeyError) as exc:
        if "not recognized" in str(exc):
            raise DataError(f"--split_scheme {config.split_scheme!r} is not one of {name}'s: {exc}") from None
        # e.g. pandas' ParserError on a truncated reviews.csv
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(
            f"{name} under {config.root_dir!r} cannot be read ({type(exc).__name__}: {first}); a file is damaged "
            "or incomplete: download the dataset again"
        ) from None
