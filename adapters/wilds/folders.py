"""DomainBed-layout image folders (PACS, VLCS, OfficeHome, ...) as WILDS datasets.

The layout is DomainBed's: ``<root_dir>/<FOLDER>/<domain>/<class>/<any image file>``. Domains
become the ``domain`` group; one or more are held out as test domains (``--test_domain``) and a
seeded 20 % of every domain is held out for validation, as DomainBed's ``--holdout_fraction``.
Unlike DomainBed, hidden folders (``.ipynb_checkpoints``) are not taken for domains or classes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from dg_quant.adapters.wilds.datasets import CUSTOM_FOLDER, FOLDER_DATASETS
from dg_quant.adapters.wilds.domains import DomainDataset, resolve_domains
from dg_quant.errors import DataError


def _subfolders(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def find_dataset_dir(root_dir: str | os.PathLike, name: str) -> Path:
    """``root_dir/<FOLDER>`` (or ``root_dir`` itself when it is that folder); one-line error if absent."""
    root = Path(root_dir)
    if not root.is_dir():
        raise DataError(f"--root_dir {str(root)!r} does not exist; point it at the folder that holds the data")
    if name == CUSTOM_FOLDER:
        return root
    folder = FOLDER_DATASETS[name]
    for candidate in (root / folder, root):
        if candidate.is_dir() and candidate.name.lower() == folder.lower():
            return candidate
    raise DataError(
        f"--root_dir {str(root)!r} has no {folder}/ folder; point it at the folder that holds {folder}/ "
        "(DomainBed's --data_dir)"
    )


class DomainFolderDataset(DomainDataset):
    """Images in ``<dataset_dir>/<domain>/<class>/`` as a WILDS dataset; x is a PIL RGB image."""

    def __init__(
        self,
        root_dir: str,
        name: str = "pacs",
        test_domains: str | list[str] | None = None,
        holdout_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        data_dir = find_dataset_dir(root_dir, name)
        domains = _subfolders(data_dir)
        if len(domains) < 2:
            raise DataError(
                f"{data_dir} holds {len(domains)} domain folder(s); a DomainBed-layout dataset needs "
                "<domain>/<class>/<image> with at least two domains"
            )
        classes = self._common_classes(data_dir, domains)
        class_to_idx = {c: i for i, c in enumerate(classes)}
        paths: list[str] = []
        labels: list[int] = []
        domain_ids: list[int] = []
        for d, domain in enumerate(domains):
            try:
                samples = make_dataset(str(data_dir / domain), class_to_idx, extensions=IMG_EXTENSIONS)
            except FileNotFoundError as exc:
                raise DataError(f"domain {domain!r} in {data_dir}: {exc}".splitlines()[0]) from None
            paths += [p for p, _ in samples]
            labels += [y for _, y in samples]
            domain_ids += [d] * len(samples)
        self._paths = paths
        self._setup(
            name=name,
            data_dir=str(data_dir),
            y=np.asarray(labels, dtype=np.int64),
            domains=np.asarray(domain_ids, dtype=np.int64),
            domain_names=domains,
            class_names=classes,
            test_domains=resolve_domains(test_domains, domains, domains[:1]),
            holdout_fraction=holdout_fraction,
            seed=seed,
        )

    @staticmethod
    def _common_classes(data_dir: Path, domains: list[str]) -> list[str]:
        """The class folders, which every domain must share (labels are positions in this list)."""
        classes = _subfolders(data_dir / domains[0])
        if not classes:
            raise DataError(f"domain {domains[0]!r} in {data_dir} has no class folders; expected <class>/<image>")
        for domain in domains[1:]:
            other = _subfolders(data_dir / domain)
            if other != classes:
                missing = sorted(set(classes) - set(other))
                extra = sorted(set(other) - set(classes))
                raise DataError(
                    f"domain {domain!r} has different class folders than {domains[0]!r} "
                    f"(missing: {', '.join(missing) or '-'}; extra: {', '.join(extra) or '-'}); "
                    "every domain needs the same class folders"
                )
        return classes

    def get_input(self, idx: int) -> Image.Image:
        with Image.open(self._paths[idx]) as image:
            return image.convert("RGB")
