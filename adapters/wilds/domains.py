"""Multi-domain classification data exposed as a WILDS dataset with a leave-domain-out split.

Domains become the ``domain`` metadata field (so ``CombinatorialGrouper(['domain'])`` groups
by them). Splits follow DomainBed's protocol in WILDS names:

- ``train``: the training domains minus a holdout fraction,
- ``id_val``: that holdout (training-domain validation, used for model selection),
- ``test``: the held-out domains minus a holdout fraction,
- ``val``: that holdout of the held-out domains (DomainBed's "oracle" validation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dg_quant.adapters.wilds_compat import import_wilds
from dg_quant.errors import ConfigError

import_wilds()

from wilds.common.grouper import CombinatorialGrouper  # noqa: E402
from wilds.common.metrics.all_metrics import Accuracy  # noqa: E402
from wilds.datasets.wilds_dataset import WILDSDataset  # noqa: E402

SPLITS = {"train": 0, "id_val": 1, "test": 2, "val": 3}
SPLIT_NAMES = {
    "train": "Train",
    "id_val": "Validation (training domains)",
    "test": "Test (held-out domains)",
    "val": "Validation (held-out domains)",
}


def resolve_domains(requested: str | Sequence[str] | None, names: Sequence[str], default: Sequence[str]) -> list[int]:
    """Indices of the requested test domains (names, or indices as text); one-line error if unknown."""
    if requested is None or requested == "" or requested == []:
        requested = list(default)
    if isinstance(requested, str):
        requested = [r for r in requested.split(",") if r]
    indices = []
    for item in requested:
        item = str(item).strip()
        if item in names:
            indices.append(list(names).index(item))
        elif item.isdigit() and int(item) < len(names):
            indices.append(int(item))
        else:
            raise ConfigError(f"unknown domain {item!r}; choose from {', '.join(names)} (or their indices)")
    if len(set(indices)) == len(names):
        raise ConfigError("every domain is a test domain; leave at least one for training")
    return sorted(set(indices))


def leave_domain_out_splits(
    domains: np.ndarray, test_domains: Sequence[int], holdout_fraction: float, seed: int
) -> np.ndarray:
    """Split ids per example: a seeded ``holdout_fraction`` of each domain goes to validation."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ConfigError(f"holdout fraction must be in [0, 1); got {holdout_fraction}")
    rng = np.random.RandomState(seed)
    split = np.empty(len(domains), dtype=np.int64)
    for d in np.unique(domains):
        idx = np.flatnonzero(domains == d)
        idx = idx[rng.permutation(len(idx))]
        n_hold = int(len(idx) * holdout_fraction)
        test = d in test_domains
        split[idx[:n_hold]] = SPLITS["val" if test else "id_val"]
        split[idx[n_hold:]] = SPLITS["test" if test else "train"]
    return split


class DomainDataset(WILDSDataset):
    """Base class: subclasses set inputs, labels and domains, then call ``_setup``."""

    _versions_dict = {"1.0": {"download_url": None, "compressed_size": None}}

    def _setup(
        self,
        *,
        name: str,
        data_dir: str,
        y: np.ndarray,
        domains: np.ndarray,
        domain_names: Sequence[str],
        class_names: Sequence[str],
        test_domains: Sequence[int],
        holdout_fraction: float,
        seed: int,
    ) -> None:
        self._dataset_name = name
        self._version = "1.0"
        self._data_dir = data_dir
        self._split_scheme = "leave_domain_out"
        self._split_dict, self._split_names = dict(SPLITS), dict(SPLIT_NAMES)
        self._source_domain_splits = [SPLITS["train"], SPLITS["id_val"]]
        self._y_array = torch.as_tensor(y, dtype=torch.long)
        self._y_size = 1
        self._n_classes = len(class_names)
        self.class_names = list(class_names)
        self.domain_names = list(domain_names)
        self.test_domains = list(test_domains)
        self._split_array = leave_domain_out_splits(domains, test_domains, holdout_fraction, seed)
        self._metadata_fields = ["domain", "y"]
        self._metadata_array = torch.stack([torch.as_tensor(domains, dtype=torch.long), self._y_array], dim=1)
        self._metadata_map = {"domain": list(domain_names), "y": list(class_names)}
        self._eval_grouper = CombinatorialGrouper(dataset=self, groupby_fields=["domain"])
        super().__init__(data_dir, False, self._split_scheme)

    def check_batch_size(self, batch_size: int) -> None:
        """Refuse a training domain with fewer training examples than a batch.

        DomainBed draws one batch per training domain and spins forever on such a domain; here
        the error names the domain and the fix instead.
        """
        domains = self._metadata_array[:, 0].numpy()
        in_train = self._split_array == SPLITS["train"]
        for d, name in enumerate(self.domain_names):
            if d in self.test_domains:
                continue
            n = int((in_train & (domains == d)).sum())
            if n < batch_size:
                raise ConfigError(
                    f"domain {name!r} has {n} training examples, fewer than --batch_size {batch_size}; "
                    "lower --batch_size or make it a --test_domain"
                )

    def eval(self, y_pred: torch.Tensor, y_true: torch.Tensor, metadata: torch.Tensor, prediction_fn: Any = None):
        """Average accuracy, accuracy per domain and worst-domain accuracy."""
        metric = Accuracy(prediction_fn=prediction_fn)
        return self.standard_group_eval(metric, self._eval_grouper, y_pred, y_true, metadata)
