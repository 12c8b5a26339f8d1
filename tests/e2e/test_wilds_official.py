"""Camelyon17 and Amazon in the official WILDS layouts: train -> export -> table with the official metric.

The runs (``camelyon_run``, ``amazon_run``) are shared by the session. The official metric is
recomputed here outside dg-quant's evaluation: the exported file's predictions on the test split
go straight into the ``wilds`` dataset's own ``eval`` (Camelyon17: ``acc_avg`` over the test
hospital; Amazon: ``10th_percentile_acc`` over the test users).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from wilds import get_dataset

from dg_quant.adapters.wilds import analyze, export
from dg_quant.adapters.wilds.checkpoints import load_run_model, predict
from dg_quant.quant.export import load_export
from dg_quant.registry import rebuild_adapter
from tests.e2e.conftest import read_json, read_records, selected

OFFICIAL = {"camelyon17": "test/acc_avg", "amazon": "test/10th_percentile_acc"}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(params=["camelyon17", "amazon"])
def official_run(request) -> tuple[str, Path]:
    return request.param, request.getfixturevalue(f"{request.param.removesuffix('17')}_run")


def official_metric_of_export(run: Path, exported: Path) -> dict[str, float]:
    """The wilds dataset's ``eval`` on the test split, with the exported file's predictions."""
    config = read_json(run / "config.json")
    dataset = get_dataset(
        dataset=config["dataset"], root_dir=config["root_dir"], download=False, split_scheme=config["split_scheme"]
    )
    transform = load_run_model(run, "last").model.transform  # the run's evaluation input transform
    test = dataset.get_subset("test", transform=transform)
    logits, y, meta = predict(load_export(exported, rebuild_adapter), torch.utils.data.DataLoader(test, batch_size=64))
    results, _text = dataset.eval(logits.argmax(1), y, meta)
    return {f"test/{k}": float(v) for k, v in results.items()}


def test_runs_select_and_report_the_official_metric(official_run):
    name, run = official_run
    final = read_json(run / "final.json")
    assert final["test_metric"] == OFFICIAL[name]
    assert final["val_metric"] == OFFICIAL[name].replace("test/", "val/")  # WILDS' OOD validation
    records = read_records(run)
    assert [r["quantized"] for r in records] == [False, True]
    assert final["compression"]["quantized_layers"] > 0
    best = selected(records, final["val_metric"])
    assert best["step"] == 4  # the one quantized evaluation, whatever the validation before the switch
    assert final["test_at_best"] == best[OFFICIAL[name]] and final["test_at_last"] == records[-1][OFFICIAL[name]]


def test_export_reproduces_the_official_metric_through_wilds_eval(official_run, tmp_path):
    name, run = official_run
    out = tmp_path / "model.dgq"
    # the last model (here also the selected one: the only quantized evaluation)
    assert export.main([str(run), "-o", str(out), "--checkpoint", "last", "--verify"]) == 0
    official = official_metric_of_export(run, out)
    final = read_json(run / "final.json")
    assert official[OFFICIAL[name]] == pytest.approx(final["test_at_last"], abs=1e-6)
    assert official["test/acc_avg"] == pytest.approx(final["last"]["test/acc_avg"], abs=1e-6)
    # the file is as small as the run's compression report said, plus its header (MiniLM's embeddings stay FP)
    assert out.stat().st_size / 2**20 == pytest.approx(final["compression"]["packed_mb"], rel=0.05)
    assert final["compression"]["packed_mb"] < 0.7 * final["compression"]["fp32_mb"]


def test_table_shows_the_official_metric(official_run, tmp_path, capsys):
    name, run = official_run
    assert analyze.main(["table", str(run.parent), "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert OFFICIAL[name] in text
    final = read_json(run / "final.json")
    rows = {r["selection"]: r for r in read_csv(tmp_path / "runs.csv")}
    assert set(rows) >= {"training_domain", "last"}
    assert {r["metric"] for r in rows.values()} == {OFFICIAL[name]}
    assert float(rows["training_domain"]["value"]) == pytest.approx(final["test_at_best"])
    assert float(rows["last"]["value"]) == pytest.approx(final["test_at_last"])
    # the text table prints the official metric in percent, one decimal
    assert f"{100 * final['test_at_last']:.1f}" in text
