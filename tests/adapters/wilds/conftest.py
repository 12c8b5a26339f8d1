"""Miniature datasets in the official on-disk layouts, read by the real loaders.

Camelyon17 (``camelyon17_v1.0/``: RELEASE file, ``metadata.csv``, 96 px patch PNGs), Amazon
(``amazon_v2.1/``: ``reviews.csv`` written with ``QUOTE_NONNUMERIC``, ``splits/user.csv``) and a
DomainBed-layout image folder, plus a tiny hashed-bag-of-words text backbone for Amazon.
"""

from __future__ import annotations

import csv
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from dg_quant.model import DGModel
from dg_quant.registry import list_adapters, register_adapter

TEXT_MODEL = "test_text_bag"


def _png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8)).save(path)


def write_camelyon17(root: Path, patches_per_slide: int = 8, release: bool = True) -> Path:
    """5 hospitals x 2 slides; tumour patches are brighter so a tiny CNN can learn something."""
    rng = np.random.RandomState(0)
    data_dir = root / "camelyon17_v1.0"
    rows = []
    for center in range(5):
        for s in range(2):
            slide = center * 10 + s
            patient, node = f"{slide:03d}", s
            for i in range(patches_per_slide):
                tumor = i % 2
                x, y = 100 * i, 50 * center
                rows.append(
                    {
                        "patient": patient,
                        "node": node,
                        "x_coord": x,
                        "y_coord": y,
                        "tumor": tumor,
                        "slide": slide,
                        "center": center,
                        "split": int(i >= patches_per_slide - 2),
                    }
                )
                base = 170 if tumor else 70
                image = np.clip(base + rng.randint(-40, 40, size=(96, 96, 3)), 0, 255)
                name = f"patch_patient_{patient}_node_{node}_x_{x}_y_{y}.png"
                _png(data_dir / "patches" / f"patient_{patient}_node_{node}" / name, image)
    pd.DataFrame(rows).to_csv(data_dir / "metadata.csv")  # first unnamed column = row labels
    if release:
        (data_dir / "RELEASE_v1.0.txt").write_text("v1.0\n")
    return data_dir


# split per user: 0 train, 1 val (OOD users), 2 id_val, 3 test (OOD users), 4 id_test, -1 dropped
AMAZON_USERS = {
    "u00": 0,
    "u01": 0,
    "u02": 0,
    "u03": 0,
    "u04": 0,
    "u05": 0,
    "u06": 1,
    "u07": 1,
    "u08": 3,
    "u09": 3,
    "u10": 3,
    "u11": -1,
}
WORDS = {
    0: "awful, broken junk",
    1: "poor and flimsy",
    2: "okay, average item",
    3: "good value",
    4: "excellent, love it",
}


def write_amazon(root: Path, per_user: int = 6) -> Path:
    """~12 users x 6 reviews; seen users' last reviews go to id_val/id_test, as in the real split."""
    data_dir = root / "amazon_v2.1"
    (data_dir / "splits").mkdir(parents=True)
    reviews, splits = [], []
    for u, (user, split) in enumerate(AMAZON_USERS.items()):
        for i in range(per_user):
            stars = (u + i) % 5
            reviews.append(
                [
                    f"{user}",
                    f"p{(u * 7 + i) % 9}",
                    float(stars + 1),
                    "01 2, 2015",
                    1420156800 + i,
                    f"{WORDS[stars]}, said {user}",
                    f"summary {i}",
                    bool(i % 2),
                    "Books",
                    2015 + i % 2,
                ]
            )
            s = split
            if split == 0 and i == per_user - 1:
                s = 2 if u % 2 else 4
            splits.append(float(s))
    with open(data_dir / "reviews.csv", "w", newline="") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_NONNUMERIC)
        writer.writerow(
            [
                "reviewerID",
                "asin",
                "overall",
                "reviewTime",
                "unixReviewTime",
                "reviewText",
                "summary",
                "verified",
                "category",
                "reviewYear",
            ]
        )
        writer.writerows(reviews)
    pd.DataFrame({"split": splits}).to_csv(data_dir / "splits" / "user.csv", index=False)
    (data_dir / "RELEASE_v2.1.txt").write_text("v2.1\n")
    return data_dir


def write_image_folders(
    root: Path, domains=("art", "photo", "sketch"), classes=("cat", "dog"), per_class=10, size: int = 12
) -> Path:
    """DomainBed layout ``root/<domain>/<class>/<n>.png``; class 1 brighter than class 0."""
    rng = np.random.RandomState(0)
    for d in domains:
        for c, name in enumerate(classes):
            for i in range(per_class):
                image = np.clip(60 + 120 * c + rng.randint(-30, 30, size=(size, size, 3)), 0, 255)
                _png(root / d / name / f"{i}.png", image)
    return root


class HashedBag(nn.Module):
    """Mean of hashed-token embeddings over the attention mask of WILDS' packed [B, L, 2] input."""

    def __init__(self, buckets: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(buckets, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[..., 0], x[..., 1].unsqueeze(-1).float()
        return (self.embedding(ids) * mask).sum(1) / mask.sum(1).clamp_min(1)


class HashTokenizer:
    """str -> [max_token_length, 2] (token ids, attention mask), like WILDS' BERT transform."""

    def __init__(self, buckets: int, max_token_length: int) -> None:
        self.buckets, self.max_len = buckets, max_token_length

    def __call__(self, text: str) -> torch.Tensor:
        words = text.lower().replace(",", " ").split()[: self.max_len]
        ids = [1 + zlib.crc32(w.encode()) % (self.buckets - 1) for w in words]
        out = torch.zeros(self.max_len, 2, dtype=torch.long)
        out[: len(ids), 0] = torch.tensor(ids, dtype=torch.long)
        out[: len(ids), 1] = 1
        return out


def tiny_text_bag(num_classes: int, max_token_length: int = 16, buckets: int = 64, dim: int = 16) -> DGModel:
    featurizer = nn.Sequential(HashedBag(buckets, dim), nn.Linear(dim, dim), nn.ReLU())
    return DGModel(featurizer, nn.Linear(dim, num_classes), dim, transform=HashTokenizer(buckets, max_token_length))


if TEXT_MODEL not in list_adapters():
    register_adapter(tiny_text_bag, name=TEXT_MODEL)


@pytest.fixture(scope="session")
def camelyon_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wilds_data")
    write_camelyon17(root)
    return root


@pytest.fixture(scope="session")
def amazon_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wilds_data")
    write_amazon(root)
    return root


@pytest.fixture(scope="session")
def folder_root(tmp_path_factory) -> Path:
    return write_image_folders(tmp_path_factory.mktemp("folders") / "mini")


@pytest.fixture(scope="session")
def make_camelyon17():
    """The writer itself, for tests that need a broken or smaller copy."""
    return write_camelyon17


@pytest.fixture(scope="session")
def make_image_folders():
    return write_image_folders
