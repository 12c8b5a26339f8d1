"""Camelyon17 through the real WILDS loader and metrics, on a miniature copy in the official layout."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dg_quant.adapters.wilds.cli import main
from dg_quant.adapters.wilds.transforms import resize_transform
from dg_quant.registry import create_adapter

FAST = [
    "--dataset",
    "camelyon17",
    "--model",
    "test_cnn",
    "--batch_size",
    "8",
    "--n_steps",
    "8",
    "--eval_every",
    "4",
    "--no_progress",
    "--device",
    "cpu",
]


def _run(root, log_dir, *extra):
    assert main([*FAST, "--root_dir", str(root), "--log_dir", str(log_dir), *extra]) == 0
    return json.loads((log_dir / "final.json").read_text())


def test_erm_reports_official_metrics_that_match_the_saved_model(camelyon_root, tmp_path):
    final = _run(camelyon_root, tmp_path / "erm")
    config = json.loads((tmp_path / "erm" / "config.json").read_text())
    # the official preset, apart from what the command line overrode
    assert (config["optimizer"], config["lr"], config["weight_decay"]) == ("sgd", 1e-3, 1e-2)
    assert (config["transform"], config["image_size"], config["groupby_fields"]) == ("wilds", 96, ["hospital"])
    assert final["val_metric"] == "val/acc_avg" and final["test_metric"] == "test/acc_avg"
    last = final["last"]
    # WILDS' group eval over slides; the test hospital (2) holds slides 20 and 21 only
    assert {k for k in last if k.startswith("test/acc_slide:")} == {"test/acc_slide:20", "test/acc_slide:21"}
    assert final["test_at_last"] == last["test/acc_avg"]
    assert final["test_at_best"] == final["best"]["test/acc_avg"]
    records = [json.loads(line) for line in (tmp_path / "erm" / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8]
    assert final["best"]["val/acc_avg"] == max(r["val/acc_avg"] for r in records)
    assert all("id_val/acc_avg" in r and "val/acc_avg" in r and "test/acc_avg" in r for r in records)

    # recompute the test-hospital accuracy from model.pt and the PNGs, outside the runner
    model = create_adapter("test_cnn", num_classes=2)
    model.load_state_dict(torch.load(tmp_path / "erm" / "model.pt", weights_only=False)["model"])
    model.eval()
    data_dir = camelyon_root / "camelyon17_v1.0"
    meta = pd.read_csv(data_dir / "metadata.csv", index_col=0, dtype={"patient": str})
    test = meta[meta.center == 2]
    transform = resize_transform(96)
    x = torch.stack(
        [
            transform(
                Image.open(
                    data_dir
                    / "patches"
                    / f"patient_{r.patient}_node_{r.node}"
                    / f"patch_patient_{r.patient}_node_{r.node}_x_{r.x_coord}_y_{r.y_coord}.png"
                ).convert("RGB")
            )
            for r in test.itertuples()
        ]
    )
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    assert last["test/acc_avg"] == pytest.approx(float(np.mean(pred == test.tumor.values)), abs=1e-6)


def test_qtdog_quantizes_and_reports(camelyon_root, tmp_path):
    final = _run(
        camelyon_root, tmp_path / "qtdog", "--plugin", "dg_quant.qtdog", "--bits", "4", "--quant_start_step", "2"
    )
    assert final["plugins"] == ["dg_quant.qtdog"]
    assert final["last"]["quantized"] is True
    assert final["compression"]["compression_ratio"] > 1.0 and final["compression"]["quantized_layers"] > 0
    assert 0.0 <= final["test_at_last"] <= 1.0


def test_wrong_root_and_missing_release_are_one_line_errors(make_camelyon17, tmp_path, capsys):
    assert main([*FAST, "--root_dir", str(tmp_path / "nowhere"), "--log_dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--root_dir" in err and "does not exist" in err and err.count("\n") == 1
    assert not (tmp_path / "nowhere").exists()  # WILDS would have created it

    make_camelyon17(tmp_path / "data", patches_per_slide=2, release=False)
    assert main([*FAST, "--root_dir", str(tmp_path / "data"), "--log_dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "RELEASE_v1.0.txt" in err and err.count("\n") == 1
