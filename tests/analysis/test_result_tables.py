"""DomainBed-style tables: selection rules, mean +- standard error over seeds, Avg, formats."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dg_quant.adapters.wilds import run_results
from dg_quant.analysis import tables
from dg_quant.errors import DataError

# (method plugins, test domain, seed) -> records as (step, id_val, val, test)
SYNTHETIC = {
    ((), "A", 0): [(10, 0.5, 0.40, 0.30), (20, 0.7, 0.35, 0.50), (30, 0.6, 0.60, 0.45)],
    ((), "A", 1): [(10, 0.8, 0.20, 0.60), (20, 0.7, 0.50, 0.40), (30, 0.6, 0.30, 0.70)],
    ((), "B", 0): [(10, 0.9, 0.10, 0.20), (20, 0.8, 0.90, 0.80)],
    (("dg_quant.qtdog",), "A", 0): [(10, 0.4, 0.10, 0.10), (20, 0.9, 0.20, 0.90)],
}


def collect(paths, group_by=(), **kwargs):
    """The tables over run folders, as ``dgq_analyze table`` builds them."""
    return tables.collect(*run_results.read_runs(paths, group_by), **kwargs)


def write_run(
    folder, plugins, test_env, seed, records, bits=None, model="m", dataset="toy", extra=None, test_metric=None
):
    """A run folder as wilds_run writes it; ``extra(test_acc) -> {key: value}`` adds record keys."""
    folder.mkdir(parents=True)
    rows = [
        {
            "step": s,
            "id_val/acc_avg": i,
            "val/acc_avg": v,
            "test/acc_avg": t,
            f"test/acc_domain:{test_env}": t,
            **(extra(i, v, t) if extra else {}),
        }
        for s, i, v, t in records
    ]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "dataset": dataset,
        "plugins": plugins,
        "seed": seed,
        "test_domain": test_env,
        "val_metric": "id_val/acc_avg",
        "bits": bits,
        "model": model,
    }
    if test_metric:
        config["test_metric"] = test_metric
    (folder / "config.json").write_text(json.dumps(config))
    best = max(rows, key=lambda r: r["id_val/acc_avg"])
    final = {
        "dataset": dataset,
        "plugins": plugins,
        "seed": seed,
        "val_metric": "id_val/acc_avg",
        "best": best,
        "last": rows[-1],
        "model": model,
    }
    if test_metric:
        final["test_metric"] = test_metric
    (folder / "final.json").write_text(json.dumps(final))


@pytest.fixture
def synthetic(tmp_path):
    for i, ((plugins, env, seed), records) in enumerate(SYNTHETIC.items()):
        write_run(tmp_path / "sweep" / f"run{i}", list(plugins), env, seed, records)
    return tmp_path / "sweep"


def test_selection_rules_pick_the_documented_record():
    records = [{"step": s, "id_val/acc_avg": i, "val/acc_avg": v} for s, i, v, _ in SYNTHETIC[((), "A", 1)]]
    assert tables.select_record(records, "training_domain", "id_val/acc_avg")["step"] == 10
    assert tables.select_record(records, "oracle", "id_val/acc_avg")["step"] == 20
    assert tables.select_record(records, "last", "id_val/acc_avg")["step"] == 30
    tie = [{"step": 1, "v": 0.5}, {"step": 2, "v": 0.5}]
    assert tables.select_record(tie, "training_domain", "v")["step"] == 1
    with pytest.raises(DataError):
        tables.select_record(records, "best_test", "v")


def test_mean_and_stderr_follow_domainbed(synthetic):
    summary = tables.summarize(collect([synthetic]))
    row = summary[(summary.selection == "training_domain") & (summary.method == "erm") & (summary.test_env == "A")]
    values = np.array([0.50, 0.60]) * 100  # test acc at the best id_val of seed 0 and seed 1
    assert row["mean"].item() == pytest.approx(values.mean())
    assert row["stderr"].item() == pytest.approx(np.std(values) / math.sqrt(2))
    assert row["n"].item() == 2
    oracle = summary[(summary.selection == "oracle") & (summary.method == "erm") & (summary.test_env == "A")]
    assert oracle["mean"].item() == pytest.approx((0.45 + 0.40) / 2 * 100)
    last = summary[(summary.selection == "last") & (summary.method == "erm") & (summary.test_env == "B")]
    assert last["mean"].item() == pytest.approx(80.0) and last["stderr"].item() == 0.0


def test_wide_table_has_avg_and_marks_missing_cells(synthetic):
    wide = tables.wide_tables(tables.summarize(collect([synthetic])))
    assert list(wide) == [(rule, "toy", "test/acc_avg") for rule in ("training_domain", "last", "oracle")]
    table = wide[("training_domain", "toy", "test/acc_avg")]
    assert list(table.columns) == ["A", "B", "Avg"]
    assert table.loc["erm", "A"] == "55.0 +- 3.5"
    assert table.loc["erm", "Avg"] == f"{(55.0 + 20.0) / 2:.1f}"
    assert table.loc["qtdog", "B"] == "X" and table.loc["qtdog", "Avg"] == "X"


def test_renderers(synthetic):
    wide = tables.wide_tables(tables.summarize(collect([synthetic], selections=["training_domain"])))
    text = tables.render(wide, "text")
    assert "toy, test/acc_avg, model selection: training-domain" in text and "55.0 +- 3.5" in text
    markdown = tables.render(wide, "markdown")
    assert "| method | A | B | Avg |" in markdown and "| erm | 55.0 +- 3.5 |" in markdown
    latex = tables.render(wide, "latex")
    assert r"55.0 $\pm$ 3.5" in latex and r"\begin{tabular}" in latex
    with pytest.raises(DataError):
        tables.render(wide, "html")


def test_group_by_setting_and_duplicate_seeds(tmp_path):
    # an lr sweep: same method, backbone and bits; its runs differ only in a setting of their own
    for name, lr, record in (
        ("a", 0.1, (10, 0.5, 0.1, 0.3)),
        ("b", 0.2, (10, 0.6, 0.1, 0.4)),
        ("c", 0.2, (10, 0.9, 0.1, 0.7)),
    ):
        write_run(tmp_path / name, ["dg_quant.qtdog"], "A", 0, [record], bits=8)
        config = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**config, "lr": lr}))
    merged = collect([tmp_path], selections=["training_domain"])
    assert len(merged) == 1 and merged["value"].item() == 0.7  # best validation among duplicates
    split = collect([tmp_path], selections=["training_domain"], group_by=["lr"])
    assert sorted(split["method"]) == ["qtdog (lr=0.1)", "qtdog (lr=0.2)"]


def test_cells_report_each_runs_official_metric(tmp_path):
    # Amazon-like: the official metric is the 10th-percentile accuracy, not the average
    tenth = lambda i, v, t: {"test/10th_percentile_acc": t - 0.2, "val/10th_percentile_acc": v - 0.2}  # noqa: E731
    write_run(
        tmp_path / "amazon",
        [],
        "A",
        0,
        [(10, 0.5, 0.5, 0.41), (20, 0.4, 0.6, 0.45)],
        dataset="amazon",
        extra=tenth,
        test_metric="test/10th_percentile_acc",
    )
    write_run(tmp_path / "pacs", [], "A", 0, [(10, 0.5, 0.1, 0.7)], dataset="pacs")
    frame = collect([tmp_path])
    amazon = frame[frame.dataset == "amazon"].set_index("selection")
    assert set(amazon["metric"]) == {"test/10th_percentile_acc"}
    assert amazon.loc["training_domain", "value"] == pytest.approx(0.21)
    assert amazon.loc["oracle", "step"] == 20  # best val/10th_percentile_acc, the same metric held out
    assert frame[frame.dataset == "pacs"]["value"].tolist() == [0.7, 0.7, 0.7]  # the run's only record
    wide = tables.wide_tables(tables.summarize(frame))
    assert ("training_domain", "amazon", "test/10th_percentile_acc") in wide
    text = tables.render(wide, "text")
    assert "amazon, test/10th_percentile_acc, model selection: training-domain" in text and "21.0 +- 0.0" in text
    # --metric still overrides every run's own
    assert set(collect([tmp_path], metric="test/acc_avg")["metric"]) == {"test/acc_avg"}


def test_runs_with_different_backbones_or_bits_get_their_own_rows(tmp_path):
    write_run(tmp_path / "r50", [], "A", 0, [(10, 0.5, 0.1, 0.3)], model="resnet50")
    write_run(tmp_path / "mnv2", [], "A", 0, [(10, 0.9, 0.1, 0.6)], model="mobilenet_v2")
    write_run(tmp_path / "q7", ["dg_quant.qtdog"], "A", 0, [(10, 0.9, 0.1, 0.5)], model="resnet50", bits=7)
    write_run(tmp_path / "q5", ["dg_quant.qtdog"], "A", 0, [(10, 0.9, 0.1, 0.4)], model="resnet50", bits=5)
    frame = collect([tmp_path], selections=["training_domain"])
    assert len(frame) == 4  # nothing merged away
    table = tables.wide_tables(tables.summarize(frame))[("training_domain", "toy", "test/acc_avg")]
    assert sorted(table.index) == [
        "erm mobilenet_v2 fp32",
        "erm resnet50 fp32",
        "qtdog resnet50 w5",
        "qtdog resnet50 w7",
    ]
    assert table.loc["erm mobilenet_v2 fp32", "A"] == "60.0 +- 0.0"
    assert table.loc["erm resnet50 fp32", "A"] == "30.0 +- 0.0"


def test_real_runs(tiny_runs):
    frame = collect([tiny_runs["root"]], selections=["training_domain", "last"])
    erm = frame[(frame.method == "erm") & (frame.selection == "training_domain")]
    assert sorted(erm["seed"]) == ["0", "1"] and set(erm["test_env"]) == {"rot75"}
    for _, row in erm.iterrows():
        final = json.loads((tiny_runs[f"erm{row.seed}"] / "final.json").read_text())
        assert row["value"] == pytest.approx(final["best"]["test/acc_avg"])
        assert row["step"] == final["best"]["step"]
    assert set(frame["method"]) == {"erm", "qtdog", "EoQ erm"}
    ensemble = frame[frame.method == "EoQ erm"]
    summary = json.loads((tiny_runs["eoq"] / "eoq.json").read_text())
    assert ensemble["selection"].tolist() == ["training_domain"] and ensemble["seed"].item() == "0,1"
    assert ensemble["value"].item() == pytest.approx(summary["ensemble"]["test/acc_avg"])


def test_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        run_results.find_runs([tmp_path / "nope"])
    with pytest.raises(DataError, match="no run folders"):
        run_results.find_runs([tmp_path])
