"""``wilds_run`` end to end on the embedded dataset, and its one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from dg_quant.adapters.wilds.cli import main, parse_config
from dg_quant.adapters.wilds.results import main as results_main
from dg_quant.adapters.wilds.runner import run
from dg_quant.hookimpl import hookimpl
from dg_quant.io import read_jsonl

FAST = ["--n_steps", "40", "--eval_every", "20", "--no_progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    erm, qtdog = root / "erm", root / "qtdog"
    assert main([*FAST, "--log_dir", str(erm)]) == 0
    assert main(["--plugin", "dg_quant.qtdog", "--bits", "7", *FAST, "--log_dir", str(qtdog)]) == 0
    return erm, qtdog


def test_run_writes_machine_readable_results(runs) -> None:
    erm, _ = runs
    for name in ("config.json", "results.jsonl", "final.json", "model.pt", "best_model.pt", "last.pt"):
        assert (erm / name).is_file(), name
    records = read_jsonl(erm / "results.jsonl")
    assert [r["step"] for r in records] == [20, 40]
    for split in ("id_val", "val", "test"):
        assert 0.0 <= records[-1][f"{split}/acc_avg"] <= 1.0
    # per-domain accuracy: the training domains in id_val, the held-out domain in test
    assert "id_val/acc_domain:rot0" in records[-1] and "test/acc_domain:rot75" in records[-1]
    assert "test/acc_domain:rot0" not in records[-1]
    # counts are integers and epochs short decimals (18 steps per epoch: 20/18 -> 1.1111)
    assert records[-1]["test/count_domain:rot75"] == 240 and isinstance(records[-1]["test/count_domain:rot75"], int)
    assert [r["epoch"] for r in records] == [1.1111, 2.2222]
    final = json.loads((erm / "final.json").read_text())
    assert final["plugins"] == [] and final["last"] == records[-1]
    assert final["best"]["id_val/acc_avg"] == max(r["id_val/acc_avg"] for r in records)


def test_training_learns_beyond_chance(runs) -> None:
    erm, _ = runs
    last = read_jsonl(erm / "results.jsonl")[-1]
    assert last["id_val/acc_avg"] > 0.3  # 10 classes: chance is 0.1


def test_qtdog_run_is_quantized_after_the_scaled_switch(runs) -> None:
    _, qtdog = runs
    records = read_jsonl(qtdog / "results.jsonl")
    # 40 steps -> quantization starts at step 16 (2000/5000 of the run)
    assert all(r["quantized"] for r in records)
    final = json.loads((qtdog / "final.json").read_text())
    assert final["plugins"] == ["dg_quant.qtdog"]
    assert 32 / 7 * 0.8 < final["compression"]["compression_ratio"] < 32 / 7
    saved = torch.load(qtdog / "model.pt", weights_only=False)
    assert any(k.endswith("parametrizations.weight.original") for k in saved["model"])


def test_resuming_a_finished_run_changes_nothing(runs, capsys) -> None:
    _, qtdog = runs
    before = {p.name: p.read_bytes() for p in qtdog.iterdir() if p.name != "config.json"}
    assert main(["--plugin", "dg_quant.qtdog", "--bits", "7", *FAST, "--log_dir", str(qtdog), "--resume"]) == 0
    assert "method qtdog" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in qtdog.iterdir() if p.name != "config.json"} == before


def test_results_command_compares_runs(runs, capsys) -> None:
    erm, qtdog = runs
    assert results_main([str(erm), str(qtdog)]) == 0
    out = capsys.readouterr().out.splitlines()
    head = out[0].split()
    assert head[:6] == ["run", "dataset", "test_domain", "method", "model", "bits"]
    # the columns name the metrics they show: the selection metric is id_val's, not "val"
    assert head[6:9] == ["id_val/acc_avg@best", "test/acc_avg@best", "test/acc_avg@last"]
    rows = [line.split() for line in out[1:]]
    assert [r[1:6] for r in rows] == [
        ["rotated_digits", "rot75", "erm", "digits_cnn", "fp32"],
        ["rotated_digits", "rot75", "qtdog", "digits_cnn", "w7"],
    ]
    final = json.loads((erm / "final.json").read_text())
    assert float(rows[0][6]) == pytest.approx(final["best"]["id_val/acc_avg"], abs=1e-4)
    assert float(rows[0][8]) == pytest.approx(final["last"]["test/acc_avg"], abs=1e-4)


def test_results_command_walks_a_parent_folder(runs, capsys) -> None:
    erm, qtdog = runs
    assert results_main([str(erm.parent)]) == 0
    runs_shown = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert runs_shown == [str(erm), str(qtdog)]
    assert results_main([str(erm / "model.pt")]) == 2
    assert "no final.json" in capsys.readouterr().err


def test_results_command_reports_each_runs_official_metric(tmp_path, capsys) -> None:
    record = {
        "step": 5,
        "val/acc_avg": 0.6,
        "val/10th_percentile_acc": 0.4,
        "test/acc_avg": 0.417,
        "test/10th_percentile_acc": 0.30,
    }
    final = {
        "dataset": "amazon",
        "plugins": [],
        "model": "distilbert",
        "seed": 0,
        "val_metric": "val/acc_avg",
        "test_metric": "test/10th_percentile_acc",
        "best": record,
        "last": record,
    }
    (tmp_path / "amazon").mkdir()
    (tmp_path / "amazon" / "final.json").write_text(json.dumps(final))
    assert results_main([str(tmp_path)]) == 0
    head, row = (line.split() for line in capsys.readouterr().out.splitlines())
    assert head[head.index("test/10th_percentile_acc@best")] and "test/acc_avg@best" not in head
    assert row[head.index("test/10th_percentile_acc@best")] == "0.3000"


def test_progress_in_a_redirected_log_is_throttled(tmp_path, capsys) -> None:
    # stderr is not a terminal here (captured), as in ``wilds_run ... 2> log``
    assert main(["--n_steps", "60", "--eval_every", "20", "--log_dir", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    frames = err.count("\r")
    # the training bar at its start and end (twice: tqdm's close redraws), each evaluation bar at its
    # start and end: no per-step frames
    assert "train" in err and "eval" in err and frames <= 3 + 3 * 2, err


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("wilds_run: error:")
    return err


def test_unknown_plugin(capsys) -> None:
    err = one_line_error(capsys, ["--plugin", "dg_quant.qtdg"])
    assert "known plugins" in err and "dg_quant.qtdog" in err


def test_bits_out_of_range(capsys, tmp_path) -> None:
    err = one_line_error(capsys, ["--plugin", "dg_quant.qtdog", "--bits", "9", "--log_dir", str(tmp_path / "r")])
    assert "--bits must be an integer from 2 to 8" in err


def test_missing_root_dir(capsys, tmp_path) -> None:
    err = one_line_error(
        capsys, ["--dataset", "camelyon17", "--root_dir", str(tmp_path / "missing"), "--log_dir", str(tmp_path / "r")]
    )
    assert "--root_dir" in err and "does not exist" in err


def test_unknown_dataset(capsys, tmp_path) -> None:
    assert "known datasets" in one_line_error(
        capsys, ["--dataset", "mnistx", "--root_dir", str(tmp_path), "--log_dir", str(tmp_path / "r")]
    )


def test_existing_log_dir_is_not_overwritten(capsys, runs) -> None:
    erm, _ = runs
    assert "--resume" in one_line_error(capsys, [*FAST, "--log_dir", str(erm)])


def test_selection_split_must_be_evaluated_before_training(capsys, tmp_path) -> None:
    """--eval_splits without the --val_metric split fails at start-up, not after the last step."""
    log_dir = tmp_path / "r"
    err = one_line_error(capsys, [*FAST, "--eval_splits", "test", "--log_dir", str(log_dir)])
    assert "--val_metric 'id_val/acc_avg'" in err and "add id_val to --eval_splits" in err
    assert not (log_dir / "last.pt").exists()


def test_unknown_backbone(capsys, tmp_path) -> None:
    err = one_line_error(capsys, [*FAST, "--model", "resnet9000", "--log_dir", str(tmp_path / "r")])
    assert "known backbones" in err


def test_help_lists_plugin_options(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--plugin", "dg_quant.qtdog", "--help"])
    out = capsys.readouterr().out
    assert "--bits" in out and "--quant_start_step" in out


class _StopBefore:
    """Interrupts training (as Ctrl-C would) before the given step."""

    def __init__(self, step: int) -> None:
        self.at = step

    @hookimpl
    def dgq_step_start(self, step: int) -> None:
        if step == self.at:
            raise KeyboardInterrupt


def test_compat_run_resumes_after_the_switch_like_an_uninterrupted_run(tmp_path) -> None:
    compat = [
        "--plugin",
        "dg_quant.qtdog",
        "--qtdog_compat",
        "true",
        "--quant_start_step",
        "5",
        "--eval_every",
        "10",
        "--no_progress",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*compat, "--n_steps", "20", "--log_dir", str(straight)]) == 0
    # killed before step 13, after the switch (5) and the checkpoint at step 10
    config, host = parse_config([*compat, "--n_steps", "20", "--log_dir", str(resumed)])
    host.register(_StopBefore(13))
    with pytest.raises(KeyboardInterrupt):
        run(config, host)
    assert main([*compat, "--n_steps", "20", "--log_dir", str(resumed), "--resume"]) == 0
    assert read_jsonl(resumed / "results.jsonl") == read_jsonl(straight / "results.jsonl")
    a = torch.load(straight / "model.pt", weights_only=False)["model"]
    b = torch.load(resumed / "model.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
