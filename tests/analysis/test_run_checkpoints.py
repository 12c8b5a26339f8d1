"""Rebuilding models from run folders: the reloaded model reproduces the run's own evaluation."""

from __future__ import annotations

import json

import pytest

from dg_quant.adapters.wilds.checkpoints import evaluate_splits, load_run_model, present_splits
from dg_quant.errors import CheckpointError
from dg_quant.quant import is_quantization_enabled


@pytest.mark.parametrize("name", ["qtdog", "erm0"])
def test_reloaded_best_model_reproduces_the_best_record(tiny_runs, name):
    run = tiny_runs[name]
    model, config, load_dataset = load_run_model(run, "best")
    best = json.loads((run / "final.json").read_text())["best"]
    dataset = load_dataset()
    record = evaluate_splits(model, dataset, present_splits(dataset))
    for key in ("id_val/acc_avg", "test/acc_avg", "val/acc_avg", "test/acc_domain:rot75"):
        assert record[key] == pytest.approx(best[key], abs=1e-6)
    assert is_quantization_enabled(model) == (name == "qtdog")
    assert config.plugins == (["dg_quant.qtdog"] if name == "qtdog" else [])


def test_last_checkpoint_matches_last_record(tiny_runs):
    run = tiny_runs["qtdog"]
    loaded = load_run_model(run, "last")
    last = json.loads((run / "final.json").read_text())["last"]
    record = evaluate_splits(loaded.model, loaded.load_dataset(), ["test"])
    assert record["test/acc_avg"] == pytest.approx(last["test/acc_avg"], abs=1e-6)


def test_missing_and_damaged_checkpoints_are_one_line_errors(tiny_runs, tmp_path):
    with pytest.raises(CheckpointError, match="no best_model.pt"):
        load_run_model(tmp_path)
    (tmp_path / "best_model.pt").write_bytes((tiny_runs["qtdog"] / "best_model.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="damaged or foreign"):
        load_run_model(tmp_path)
    with pytest.raises(CheckpointError, match="unknown checkpoint"):
        load_run_model(tiny_runs["qtdog"], "middle")
