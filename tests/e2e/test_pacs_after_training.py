"""Real PACS, after training: every post-training command on the shared runs of ``pacs_runs``.

``dgq_ptq`` -> ``dgq_export --verify`` -> ``dgq_eoq --from_runs`` -> ``dgq_analyze table|flatness|noise``,
each run once per session through its ``main(argv)``; the tests recompute what the commands
report from the saved models and the run files (reloaded models, real test images).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from dg_quant.adapters.wilds import analyze, eoq, export, ptq
from dg_quant.adapters.wilds.checkpoints import (
    build_model,
    eval_loader,
    evaluate_splits,
    predict,
    read_checkpoint,
)
from dg_quant.quant.export import load_export
from dg_quant.registry import rebuild_adapter
from tests.e2e.conftest import PACS_METHODS, read_json, read_records, selected

SPLITS = ("id_val", "val", "test")
EOQ_MEMBERS = ("qtdog", "fqat", "inq")
PTQ_BITS = 4


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="session")
def ptq_file(pacs_runs) -> Path:
    """GPTQ at 4 bits of the ERM run's best model, calibrated on 8 training images."""
    run = pacs_runs("erm")
    assert (
        ptq.main(
            [str(run), "--ptq_method", "gptq", "--bits", str(PTQ_BITS), "--ptq_samples", "8", "--ptq_batch_size", "8"]
        )
        == 0
    )
    return run / f"ptq_gptq_w{PTQ_BITS}.pt"


@pytest.fixture(scope="session")
def exports(pacs_runs, ptq_file, tmp_path_factory) -> dict[str, Path]:
    """``dgq_export --verify`` of every method's best model, and of the PTQ model file."""
    out = tmp_path_factory.mktemp("exports")
    files = {}
    for method in PACS_METHODS:
        files[method] = out / f"{method}.dgq"
        assert export.main([str(pacs_runs(method)), "-o", str(files[method]), "--verify"]) == 0
    files["ptq"] = out / "ptq.dgq"
    assert export.main([str(pacs_runs("erm")), "-o", str(files["ptq"]), "--checkpoint", ptq_file.name, "--verify"]) == 0
    return files


@pytest.fixture(scope="session")
def eoq_dir(pacs_runs) -> Path:
    """An EoQ of the three quantized runs, in the runs' root (so ``table`` finds it too)."""
    log_dir = pacs_runs.root / "eoq"
    assert eoq.main(["--from_runs", *(str(pacs_runs(m)) for m in EOQ_MEMBERS), "--log_dir", str(log_dir)]) == 0
    return log_dir


def test_every_run_reloads_and_reproduces_its_recorded_metrics(pacs_runs, reloaded):
    for method in PACS_METHODS:
        run = pacs_runs(method)
        final = read_json(run / "final.json")
        for which, record in (("last", final["last"]), ("best", final["best"])):
            loaded = reloaded(run, which)
            assert loaded.config.image_size == 32
            metrics = evaluate_splits(loaded.model, loaded.load_dataset(), SPLITS)
            for split in SPLITS:
                key = f"{split}/acc_avg"
                assert metrics[key] == pytest.approx(record[key], abs=1e-6), (method, which, key)


def test_ptq_puts_every_conv_on_a_4_bit_grid_and_reports_the_reloaded_model(pacs_runs, ptq_file, reloaded):
    report = read_json(ptq_file.with_suffix(".json"))
    assert report["method"] == "gptq" and report["bits"] == PTQ_BITS and report["calibration_split"] == "train"
    assert report["ptq/layers"] == 52 and len(report["layers"]) == 52
    assert report["ptq/layers_better_than_rtn"] >= 0.9 * report["ptq/layers"]
    assert report["ptq/relative_error_mean"] < report["ptq/relative_rtn_error_mean"]
    # the written file rebuilds (through the obc plugin) into a model whose convs take <= 16 values per channel
    state = read_checkpoint(ptq_file)
    assert "dg_quant.obc" in state["config"]["plugins"]
    model = build_model(state, argparse.Namespace(**state["config"])).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 52
    with torch.no_grad():
        for conv in convs:
            weight = conv.weight.flatten(1)
            assert max(len(torch.unique(row)) for row in weight) <= 2**PTQ_BITS
    # its reported "after" metrics are the reloaded model's, on the run's own splits
    metrics = evaluate_splits(model, reloaded(pacs_runs("erm")).load_dataset(), SPLITS)
    for split in SPLITS:
        assert report["after"][f"{split}/acc_avg"] == pytest.approx(metrics[f"{split}/acc_avg"], abs=1e-6)


@pytest.mark.parametrize("method", [*PACS_METHODS, "ptq"])
def test_export_reloads_to_the_same_logits_on_real_test_images(pacs_runs, exports, ptq_file, method, reloaded):
    if method == "ptq":
        state = read_checkpoint(ptq_file)
        reference = build_model(state, argparse.Namespace(**state["config"])).eval()
        dataset = reloaded(pacs_runs("erm")).load_dataset()
    else:
        loaded = reloaded(pacs_runs(method), "best")
        reference, dataset = loaded.model, loaded.load_dataset()
    exported = load_export(exports[method], rebuild_adapter)
    logits, _y, _meta = predict(reference, eval_loader(dataset, "test", reference, batch_size=64))
    again, _y, _meta = predict(exported, eval_loader(dataset, "test", reference, batch_size=64))
    assert logits.shape == (23, 7)
    assert torch.equal(again, logits)


def test_export_sizes_follow_the_bit_widths(exports, pacs_runs):
    sizes = {m: p.stat().st_size for m, p in exports.items()}
    fp = sizes["erm"]
    assert fp > 8 * 2**20  # MobileNetV2 in FP32 (3.5 M parameters)
    assert sizes["qtdog"] < fp / 3.5  # 7-bit codes
    assert sizes["ptq"] < sizes["qtdog"] and sizes["ptq"] < fp / 5  # 4-bit codes
    assert sizes["fqat"] < sizes["qtdog"]  # 4-bit codes, first conv in FP
    # INQ's best checkpoint may predate the last partition; its frozen part is stored as codes
    assert sizes["inq"] < fp


def test_eoq_averages_its_members_logits(pacs_runs, eoq_dir, reloaded):
    summary = read_json(eoq_dir / "eoq.json")
    assert summary["members"] == [str(pacs_runs(m)) for m in EOQ_MEMBERS] and summary["which"] == "best"
    loaded = [reloaded(pacs_runs(m), "best") for m in EOQ_MEMBERS]
    dataset = loaded[0].load_dataset()
    for split in SPLITS:
        outputs = [predict(lr.model, eval_loader(dataset, split, lr.model)) for lr in loaded]
        y = outputs[0][1]
        mean_logits = torch.stack([o[0] for o in outputs]).mean(0)
        accuracy = (mean_logits.argmax(1) == y).float().mean().item()
        assert summary["ensemble"][f"{split}/acc_avg"] == pytest.approx(accuracy, abs=1e-6), split
        for member, method in zip(summary["member_results"], EOQ_MEMBERS):
            best = read_json(pacs_runs(method) / "final.json")["best"]
            assert member[f"{split}/acc_avg"] == pytest.approx(best[f"{split}/acc_avg"], abs=1e-6)
    # the saved ensemble rebuilds into the same mean of logits
    model = eoq.load_eoq_model(eoq_dir / "eoq_model.pt")
    x, _y, _meta = next(iter(eval_loader(dataset, "test", loaded[0].model, batch_size=8)))
    with torch.no_grad():
        assert torch.allclose(model(x), torch.stack([lr.model(x) for lr in loaded]).mean(0))
    packed = [read_json(pacs_runs(m) / "final.json")["compression"]["packed_mb"] for m in EOQ_MEMBERS]
    assert summary["size"]["members"] == 3 and summary["size"]["member_packed_mb"][:2] == pytest.approx(packed[:2])


def test_table_reports_each_rule_from_the_run_files(pacs_runs, eoq_dir, tmp_path):
    assert analyze.main(["table", str(pacs_runs.root), "--format", "csv", "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "runs.csv")
    expected = {}
    for method in PACS_METHODS:
        records = [r for r in read_records(pacs_runs(method)) if "test/acc_avg" in r]
        expected[("last", method)] = records[-1]["test/acc_avg"]
        expected[("training_domain", method)] = selected(records, "id_val/acc_avg")["test/acc_avg"]
        expected[("oracle", method)] = selected(records, "val/acc_avg")["test/acc_avg"]
    got = {(r["selection"], r["method"]): float(r["value"]) for r in rows}
    # the ensemble counts once, under the rule its members were picked by, named after the first
    assert got.pop(("training_domain", "EoQ qtdog")) == pytest.approx(
        read_json(eoq_dir / "eoq.json")["ensemble"]["test/acc_avg"]
    )
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key
    assert {r["test_env"] for r in rows} == {"sketch"} and {r["dataset"] for r in rows} == {"pacs"}
    summary = {(r["selection"], r["method"]): float(r["mean"]) for r in read_csv(tmp_path / "results.csv")}
    assert summary[("last", "qtdog")] == pytest.approx(100 * expected[("last", "qtdog")])


def test_flatness_starts_at_the_models_own_loss(pacs_runs, tmp_path, reloaded):
    runs = [pacs_runs("erm"), pacs_runs("qtdog")]
    assert (
        analyze.main(
            [
                "flatness",
                *map(str, runs),
                "--radii",
                "0",
                "2",
                "--directions",
                "2",
                "--splits",
                "id_val",
                "test",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rows = read_csv(tmp_path / "flatness.csv")
    assert {(r["label"], r["split"], float(r["radius"])) for r in rows} == {
        (m, s, g) for m in ("erm", "qtdog") for s in ("id_val", "test") for g in (0.0, 2.0)
    }
    assert (tmp_path / "flatness.png").stat().st_size > 0
    for run in runs:
        loaded = reloaded(run, "best")
        metrics = evaluate_splits(loaded.model, loaded.load_dataset(), ["id_val", "test"])
        for split in ("id_val", "test"):
            at_zero = next(
                r for r in rows if r["label"] == run.name and r["split"] == split and float(r["radius"]) == 0.0
            )
            assert float(at_zero["f_gamma"]) == 0.0
            assert float(at_zero["loss"]) == pytest.approx(metrics[f"{split}/loss"], rel=1e-4)


def test_noise_lists_every_quantized_conv_of_the_qtdog_run(pacs_runs, tmp_path):
    run = pacs_runs("qtdog")
    assert analyze.main(["noise", str(run), "--out", str(tmp_path)]) == 0
    layers = read_csv(tmp_path / "noise_layers.csv")
    compression = read_json(run / "final.json")["compression"]
    assert {r["layer"]: int(r["numel"]) for r in layers} == {
        layer["name"]: layer["numel"] for layer in compression["layers"]
    }
    assert {int(r["bits"]) for r in layers} == {7}
    for name in ("noise.png", "noise.csv", "noise_kl.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_a_sample_of_a_split_is_drawn_from_all_of_it(pacs_runs, reloaded):
    """``--max_batches`` evaluates a seeded random sample: PACS folders are stored class by class,
    so the first batches of a split hold one or two classes (a model could score 0 % on them)."""
    loaded = reloaded(pacs_runs("erm"), "best")
    dataset = loaded.load_dataset()
    labels = torch.cat([y for _, y, _ in eval_loader(dataset, "test", loaded.model, batch_size=64)])
    k = len(labels) // 4
    first = torch.cat([y for _, y, _ in eval_loader(dataset, "test", loaded.model, batch_size=k)][:1])
    sample = torch.cat([y for _, y, _ in eval_loader(dataset, "test", loaded.model, 64, sample=k, seed=0)])
    again = torch.cat([y for _, y, _ in eval_loader(dataset, "test", loaded.model, 64, sample=k, seed=0)])
    other = torch.cat([y for _, y, _ in eval_loader(dataset, "test", loaded.model, 64, sample=k, seed=1)])
    assert len(sample) == k and torch.equal(sample, again) and not torch.equal(sample, other)
    assert len(first.unique()) <= 2 < len(sample.unique())
