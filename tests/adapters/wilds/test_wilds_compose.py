"""``wilds_run`` with DG-method plugins on the embedded digits: CORAL's domains come from the
grouper, SWAD's averaged model is the run's final, selected and saved model, MixStyle refuses a ViT."""

from __future__ import annotations

import json

import pytest
import torch

from dg_quant.adapters.wilds.cli import main
from dg_quant.io import load_torch_file, read_jsonl

FAST = ["--n_steps", "24", "--eval_every", "4", "--no_progress", "--eval_splits", "id_val", "test"]


@pytest.fixture(scope="module")
def swad_qtdog(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("runs") / "swad_qtdog"
    argv = ["--plugin", "dg_quant.swad", "--plugin", "dg_quant.qtdog", "--bits", "7", "--quant_start_step", "8"]
    argv += ["--swad_n_converge", "2", "--swad_n_tolerance", "2", "--bn_batches", "3"]
    assert main([*argv, *FAST, "--log_dir", str(log_dir)]) == 0
    return log_dir


def test_swad_average_is_the_final_selected_and_saved_model(swad_qtdog) -> None:
    records = read_jsonl(swad_qtdog / "results.jsonl")
    final = json.loads((swad_qtdog / "final.json").read_text())
    averaged = records[-1]
    assert averaged["phase"] == "final_model" and averaged["quantized"]
    assert all("id_val/loss" in r for r in records)  # the loss SWAD's valley reads
    assert final["best"] == averaged and final["test_at_best"] == averaged["test/acc_avg"]
    assert final["swad/restarts"] == 1 and final["swad/start_step"] > 8  # quantized weights only
    best = load_torch_file(swad_qtdog / "best_model.pt")["model"]
    saved = load_torch_file(swad_qtdog / "model.pt")["model"]
    assert all(torch.equal(best[k], saved[k]) for k in saved if isinstance(saved[k], torch.Tensor))
    online = load_torch_file(swad_qtdog / "last.pt")["trainer"]["model"]  # the trained weights
    assert any(not torch.equal(online[k], saved[k]) for k in saved if k.endswith("weight"))


def test_coral_with_qtdog_on_group_batches(tmp_path) -> None:
    argv = ["--plugin", "dg_quant.coral", "--plugin", "dg_quant.qtdog", "--bits", "7", "--quant_start_step", "8"]
    argv += ["--train_loader", "group", "--n_groups_per_batch", "4", "--batch_size", "32"]
    assert main([*argv, *FAST, "--log_dir", str(tmp_path / "coral")]) == 0
    records = read_jsonl(tmp_path / "coral" / "results.jsonl")
    assert all(r["train/coral/penalty"] > 0 for r in records)  # several domains in every batch
    assert records[-1]["quantized"]


def test_mixstyle_refuses_a_vit_in_one_line(tmp_path, capsys) -> None:
    code = main(["--plugin", "dg_quant.mixstyle", "--model", "test_deit", *FAST, "--log_dir", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "dg_quant.mixstyle cannot attach" in err[0]


def test_table_reports_the_average_under_every_rule(swad_qtdog) -> None:
    from dg_quant.adapters.wilds.run_results import read_run
    from dg_quant.analysis.tables import collect

    frame = collect([read_run(swad_qtdog)], selections=("training_domain", "last"))
    final = json.loads((swad_qtdog / "final.json").read_text())
    assert set(frame["method"]) == {"swad+qtdog"}
    assert list(frame["value"]) == [final["test_at_best"]] * 2


def test_flatness_of_runs_in_a_folder_is_one_command(swad_qtdog, tmp_path, capsys) -> None:
    from dg_quant.adapters.wilds.analyze import main as analyze

    erm = swad_qtdog.parent / "erm"
    assert main([*FAST, "--n_steps", "8", "--log_dir", str(erm)]) == 0
    argv = ["flatness", str(swad_qtdog.parent), "--radii", "0", "0.5", "--directions", "1", "--splits", "test"]
    assert analyze([*argv, "--max_batches", "1", "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "flatness.csv").read_text()
    assert "swad_qtdog" in summary and "erm" in summary


def test_mixstyle_with_qtdog_on_camelyon17_mixes_across_hospitals(camelyon_root, tmp_path) -> None:
    argv = ["--dataset", "camelyon17", "--root_dir", str(camelyon_root), "--model", "test_mobilenet"]
    argv += ["--plugin", "dg_quant.mixstyle", "--plugin", "dg_quant.qtdog", "--mixstyle_mix", "crossdomain"]
    argv += ["--batch_size", "8", "--n_steps", "6", "--eval_every", "3", "--quant_start_step", "2", "--no_progress"]
    assert main([*argv, "--log_dir", str(tmp_path / "ms")]) == 0
    final = json.loads((tmp_path / "ms" / "final.json").read_text())
    assert final["plugins"] == ["dg_quant.mixstyle", "dg_quant.qtdog"] and final["best"]["quantized"]
