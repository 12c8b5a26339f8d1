"""``--logger tensorboard csv``: the records of results.jsonl, readable by TensorBoard and a CSV reader."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dg_quant.adapters.wilds.cli import main, parse_config
from dg_quant.adapters.wilds.loggers import TensorBoardLogger
from dg_quant.adapters.wilds.runner import run
from dg_quant.hookimpl import hookimpl

ARGS = [
    "-p",
    "dg_quant.qtdog",
    "--bits",
    "6",
    "--quant_start_step",
    "2",
    "--n_steps",
    "6",
    "--eval_every",
    "2",
    "--no-group_logging",
    "--no_progress",
    "--device",
    "cpu",
    "--logger",
    "tensorboard",
    "csv",
]


def _records(log_dir):
    return [json.loads(line) for line in (log_dir / "results.jsonl").read_text().splitlines()]


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("loggers") / "run"
    assert main([*ARGS, "--log_dir", str(log_dir)]) == 0
    return log_dir


def test_csv_holds_the_records_of_results_jsonl(logged) -> None:
    records = _records(logged)
    table = pd.read_csv(logged / "results.csv")
    assert len(table) == len(records) == 3
    assert list(table["step"]) == [r["step"] for r in records]
    for key in ("test/acc_avg", "id_val/acc_avg", "train/loss", "compression_ratio", "quantized_param_fraction"):
        assert table[key].tolist() == pytest.approx([r[key] for r in records])


def test_tensorboard_event_file_has_every_numeric_record_key(logged) -> None:
    records = _records(logged)
    scalars = _scalars(logged)
    for key in ("test/acc_avg", "id_val/acc_avg", "train/loss", "compression_ratio", "packed_mb"):
        assert scalars[key] == [(r["step"], pytest.approx(r[key])) for r in records]
    # the quantization figures: off at step 2, on (6 bits, fraction of weights quantized) after
    assert [v for _, v in scalars["quantized"]] == [0.0, 1.0, 1.0]
    assert scalars["quantized_param_fraction"][-1][1] > 0.9
    assert scalars["compression_ratio"][-1][1] > 4


class Kill:
    @hookimpl
    def dgq_step_start(self, step: int) -> None:
        if step == 5:
            raise KeyboardInterrupt


def test_a_resumed_run_logs_each_step_once(logged, tmp_path) -> None:
    argv = [*ARGS, "--log_dir", str(tmp_path)]
    config, host = parse_config(argv)
    host.register(Kill())
    with pytest.raises(KeyboardInterrupt):
        run(config, host)
    assert main([*argv, "--resume"]) == 0
    scalars = _scalars(tmp_path)
    assert [s for s, _ in scalars["test/acc_avg"]] == [2, 4, 6]
    assert scalars["test/acc_avg"] == _scalars(logged)["test/acc_avg"]
    assert pd.read_csv(tmp_path / "results.csv")["step"].tolist() == [2, 4, 6]


def test_missing_tensorboard_names_the_extra(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(__import__("sys").modules, "tensorboard", None)
    with pytest.raises(Exception, match=r"dg-quant\[tensorboard\]"):
        TensorBoardLogger(tmp_path)


def test_a_logger_can_be_added_when_resuming(tmp_path) -> None:
    plain = [a for a in ARGS if a not in ("--logger", "tensorboard", "csv")]
    argv = [*plain, "--log_dir", str(tmp_path)]
    config, host = parse_config(argv)
    host.register(Kill())
    with pytest.raises(KeyboardInterrupt):
        run(config, host)
    assert main([*argv, "--resume", "--logger", "csv"]) == 0  # the sinks do not change results
    assert pd.read_csv(tmp_path / "results.csv")["step"].tolist() == [2, 4, 6]  # the whole run, rewritten
