"""DomainBed-layout image folders as WILDS datasets: splits, labels, transforms, clear errors."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from dg_quant.adapters.wilds.cli import main
from dg_quant.adapters.wilds.domains import SPLITS
from dg_quant.adapters.wilds.folders import DomainFolderDataset
from dg_quant.adapters.wilds.transforms import build_transforms
from dg_quant.errors import ConfigError, DataError

FAST = [
    "--dataset",
    "image_folder",
    "--model",
    "test_cnn",
    "--image_size",
    "16",
    "--batch_size",
    "8",
    "--n_steps",
    "4",
    "--no_progress",
    "--device",
    "cpu",
]


def test_domains_become_groups_with_a_leave_one_out_split(folder_root):
    (folder_root / ".ipynb_checkpoints").mkdir(exist_ok=True)  # DomainBed would take it for a domain
    data = DomainFolderDataset(str(folder_root), name="image_folder", test_domains="sketch")
    assert data.domain_names == ["art", "photo", "sketch"] and data.class_names == ["cat", "dog"]
    assert data.metadata_fields[:2] == ["domain", "y"] and len(data) == 60
    domains, split = data.metadata_array[:, 0].numpy(), data.split_array
    for d, name in enumerate(data.domain_names):
        mine = split[domains == d]
        held = SPLITS["val"] if name == "sketch" else SPLITS["id_val"]
        kept = SPLITS["test"] if name == "sketch" else SPLITS["train"]
        assert (mine == held).sum() == 4 and (mine == kept).sum() == 16  # 20 % of 20 images held out
    # labels follow the class folder; the brighter class is 'dog'
    x, y, meta = data[int(np.flatnonzero(data.y_array.numpy() == 1)[0])]
    assert isinstance(x, Image.Image) and int(y) == 1 and np.asarray(x).mean() > 120
    # the split is seeded: the same seed gives the same split, another seed another
    again = DomainFolderDataset(str(folder_root), name="image_folder", test_domains="2")
    other = DomainFolderDataset(str(folder_root), name="image_folder", test_domains="sketch", seed=1)
    assert (again.split_array == split).all() and (other.split_array != split).any()


def test_domainbed_transforms_augment_training_only(folder_root):
    image = Image.open(next((folder_root / "art" / "dog").iterdir())).convert("RGB")
    train, evaluate = build_transforms("domainbed", 24, None)
    assert train(image).shape == evaluate(image).shape == (3, 24, 24)
    torch.manual_seed(0)
    assert not all(torch.equal(train(image), train(image)) for _ in range(3))
    assert torch.equal(evaluate(image), evaluate(image))


def test_wilds_run_trains_on_image_folders(folder_root, tmp_path):
    assert main([*FAST, "--root_dir", str(folder_root), "--test_domain", "photo", "--log_dir", str(tmp_path)]) == 0
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["val_metric"] == "id_val/acc_avg" and final["test_metric"] == "test/acc_avg"
    last = final["last"]
    assert {k for k in last if k.startswith("test/acc_domain:")} == {"test/acc_domain:photo"}
    assert {k for k in last if k.startswith("id_val/acc_domain:")} == {
        "id_val/acc_domain:art",
        "id_val/acc_domain:sketch",
    }
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["transform"], config["optimizer"], config["lr"]) == ("domainbed", "adam", 5e-5)


def test_unknown_domain_wrong_root_and_missing_classes(folder_root, make_image_folders, tmp_path):
    with pytest.raises(ConfigError, match="unknown domain 'clipart'; choose from art, photo, sketch"):
        DomainFolderDataset(str(folder_root), name="image_folder", test_domains="clipart")
    with pytest.raises(DataError, match="has no PACS/ folder"):
        DomainFolderDataset(str(folder_root), name="pacs")
    with pytest.raises(DataError, match="does not exist"):
        DomainFolderDataset(str(tmp_path / "nowhere"), name="pacs")
    root = make_image_folders(tmp_path / "PACS", per_class=2)
    for f in (root / "photo" / "dog").iterdir():
        f.unlink()
    (root / "photo" / "dog").rmdir()
    with pytest.raises(DataError, match="domain 'photo' has different class folders.*missing: dog"):
        DomainFolderDataset(str(tmp_path), name="pacs")


def test_domain_smaller_than_batch_is_an_error_not_a_hang(make_image_folders, tmp_path, capsys):
    root = make_image_folders(tmp_path / "data", per_class=10)
    for f in sorted((root / "photo" / "cat").iterdir())[3:]:
        f.unlink()  # photo: 13 images, 11 of them for training after the holdout
    start = time.monotonic()
    argv = [
        *FAST,
        "--root_dir",
        str(root),
        "--test_domain",
        "sketch",
        "--batch_size",
        "12",
        "--log_dir",
        str(tmp_path / "run"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "domain 'photo' has 11 training examples, fewer than --batch_size 12" in err
    assert time.monotonic() - start < 30
