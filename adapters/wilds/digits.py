"""The embedded default dataset: scikit-learn's handwritten digits, rotated into six domains.

It needs no download: the 1,797 8x8 digit scans ship inside scikit-learn. As in DomainBed's
RotatedMNIST, the images are dealt to domains rotated by 0, 15, 30, 45, 60 and 75 degrees
(each image appears in one domain only); the default test domain is ``rot75``.
"""

from __future__ import annotations

from importlib.resources import files

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from dg_quant.adapters.wilds.domains import DomainDataset, resolve_domains

ANGLES = (0, 15, 30, 45, 60, 75)
DOMAIN_NAMES = tuple(f"rot{a}" for a in ANGLES)
DEFAULT_TEST_DOMAINS = ("rot75",)
IMAGE_SIZE = 16


class RotatedDigitsDataset(DomainDataset):
    """Rotated scikit-learn digits as a WILDS dataset: x is a [1, 16, 16] tensor in [-1, 1]."""

    def __init__(
        self,
        root_dir: str | None = None,
        download: bool = False,
        split_scheme: str = "leave_domain_out",
        test_domains: str | list[str] | None = None,
        holdout_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        rng = np.random.RandomState(seed)
        order = rng.permutation(len(digits.target))
        domains = np.empty(len(order), dtype=np.int64)
        domains[order] = np.arange(len(order)) % len(ANGLES)  # dealt round-robin, as DomainBed
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
        self._inputs = torch.empty_like(images)
        for d, angle in enumerate(ANGLES):
            mask = torch.as_tensor(domains == d)
            self._inputs[mask] = TF.rotate(images[mask], angle, interpolation=TF.InterpolationMode.BILINEAR)
        self._inputs = self._inputs * 2 - 1
        data_dir = str(files("sklearn.datasets") / "data")  # where digits.csv.gz ships
        self._setup(
            name="rotated_digits",
            data_dir=data_dir,
            y=digits.target,
            domains=domains,
            domain_names=DOMAIN_NAMES,
            class_names=[str(c) for c in range(10)],
            test_domains=resolve_domains(test_domains, DOMAIN_NAMES, DEFAULT_TEST_DOMAINS),
            holdout_fraction=holdout_fraction,
            seed=seed,
        )

    def get_input(self, idx: int) -> torch.Tensor:
        return self._inputs[idx]
