"""Amazon through the real WILDS loader and metrics, on a miniature copy in the official layout."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from dg_quant.adapters.wilds.cli import main
from dg_quant.adapters.wilds.runner import ClipGradients, decay_groups
from dg_quant.registry import create_adapter

TEXT_MODEL = "test_text_bag"  # registered by this folder's conftest
FAST = [
    "--dataset",
    "amazon",
    "--model",
    TEXT_MODEL,
    "--batch_size",
    "6",
    "--n_steps",
    "6",
    "--eval_every",
    "3",
    "--max_token_length",
    "12",
    "--lr",
    "1e-2",
    "--no_progress",
    "--device",
    "cpu",
]


def _run(root, log_dir, *extra):
    assert main([*FAST, "--root_dir", str(root), "--log_dir", str(log_dir), *extra]) == 0
    return json.loads((log_dir / "final.json").read_text())


def test_erm_reports_10th_percentile_that_matches_the_saved_model(amazon_root, tmp_path):
    final = _run(amazon_root, tmp_path / "erm")
    config = json.loads((tmp_path / "erm" / "config.json").read_text())
    assert (config["optimizer"], config["weight_decay"], config["max_grad_norm"]) == ("adamw", 1e-2, 1.0)
    assert (config["scheduler"], config["groupby_fields"], config["transform"]) == ("linear", ["user"], "model")
    assert final["val_metric"] == "val/10th_percentile_acc"
    assert final["test_metric"] == "test/10th_percentile_acc"
    last = final["last"]
    for split in ("id_val", "val", "test", "id_test"):
        assert f"{split}/acc_avg" in last and f"{split}/10th_percentile_acc" in last
    assert not any(":" in k for k in last)  # no per-user logging, as WILDS' no_group_logging
    assert final["test_at_last"] == last["test/10th_percentile_acc"]

    # the linear schedule has decayed the learning rate to zero at the last step
    state = torch.load(tmp_path / "erm" / "last.pt", weights_only=False)
    assert all(g["lr"] == 0.0 for g in state["trainer"]["optimizer"]["param_groups"])

    # recompute the 10th-percentile per-user accuracy on the OOD test users from model.pt
    model = create_adapter(TEXT_MODEL, num_classes=5, max_token_length=12)
    model.load_state_dict(torch.load(tmp_path / "erm" / "model.pt", weights_only=False)["model"])
    model.eval()
    data_dir = amazon_root / "amazon_v2.1"
    reviews = pd.read_csv(data_dir / "reviews.csv", quoting=csv.QUOTE_NONNUMERIC, keep_default_na=False)
    split = pd.read_csv(data_dir / "splits" / "user.csv")["split"]
    test = reviews[split.values == 3]
    with torch.no_grad():
        pred = model(torch.stack([model.transform(t) for t in test.reviewText])).argmax(1).numpy()
    correct = pred == (test.overall.values - 1)
    per_user = [correct[test.reviewerID.values == u].mean() for u in pd.unique(test.reviewerID)]
    assert last["test/10th_percentile_acc"] == pytest.approx(np.percentile(per_user, 10), abs=1e-6)
    assert last["test/acc_avg"] == pytest.approx(correct.mean(), abs=1e-6)


def test_qtdog_with_group_loader_and_group_logging(amazon_root, tmp_path):
    final = _run(
        amazon_root,
        tmp_path / "qtdog",
        "--plugin",
        "dg_quant.qtdog",
        "--bits",
        "4",
        "--quant_start_step",
        "0",
        "--train_loader",
        "group",
        "--n_groups_per_batch",
        "2",
        "--group_logging",
    )
    assert final["last"]["quantized"] is True and final["compression"]["quantized_layers"] > 0
    assert {k for k in final["last"] if k.startswith("test/acc_user:")} == {
        "test/acc_user:u08",
        "test/acc_user:u09",
        "test/acc_user:u10",
    }


def test_group_loader_needs_a_divisible_batch(amazon_root, tmp_path, capsys):
    argv = [
        *FAST,
        "--root_dir",
        str(amazon_root),
        "--log_dir",
        str(tmp_path / "x"),
        "--train_loader",
        "group",
        "--n_groups_per_batch",
        "4",
    ]
    assert main(argv) == 2
    assert "evenly divisible" in capsys.readouterr().err


def test_adamw_groups_skip_bias_and_layernorm():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    decay, no_decay = decay_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert len(no_decay["params"]) == 4  # two biases, LayerNorm weight and bias


def test_clip_gradients_bounds_the_norm():
    model = nn.Linear(8, 8)
    model(torch.randn(4, 8) * 100).pow(2).sum().backward()
    before = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    ClipGradients(0.5).dgq_after_backward(model)
    after = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert before > 0.5 and after == pytest.approx(0.5, rel=1e-4)


def test_distilbert_code_path_takes_the_packed_token_tensor(amazon_root, tmp_path):
    """The backbone registry's ``test_distilbert`` (tokenizer -> [L, 2] ids and mask) under QT-DoG."""
    final = _run(
        amazon_root,
        tmp_path / "bert",
        "--model",
        "test_distilbert",
        "--max_token_length",
        "24",
        "--n_steps",
        "2",
        "--eval_every",
        "2",
        "--plugin",
        "dg_quant.qtdog",
        "--bits",
        "8",
        "--quant_start_step",
        "0",
    )
    assert final["model"] == "test_distilbert" and final["last"]["quantized"] is True
    assert 0.0 <= final["test_at_last"] <= 1.0
