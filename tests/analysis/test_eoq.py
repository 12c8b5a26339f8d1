"""EoQ: mean of member logits (QT-DoG Eq. 6), its evaluation, export and size report."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dg_quant.adapters.wilds import eoq
from dg_quant.adapters.wilds.checkpoints import eval_loader, load_run_model, predict, split_metrics
from dg_quant.ensemble import LogitEnsemble, ensemble_size
from dg_quant.errors import ConfigError
from dg_quant.quant import compression_report
from dg_quant.registry import create_adapter


def test_ensemble_is_the_mean_of_member_logits():
    a, b = create_adapter("digits_cnn", 10).eval(), create_adapter("digits_cnn", 10).eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(LogitEnsemble([a, b])(x), (a(x) + b(x)) / 2, atol=1e-6)
        same = LogitEnsemble([a, copy.deepcopy(a), copy.deepcopy(a)])(x)
        assert torch.allclose(same, a(x), atol=1e-6)
    with pytest.raises(ConfigError):
        LogitEnsemble([])


def test_ensemble_metrics_are_those_of_the_members_mean_logits(tiny_runs):
    """Two different trained members (QT-DoG and ERM): the ensemble's metrics are the metrics of
    their logit mean, computed here from each member's own predictions."""
    qtdog, erm = load_run_model(tiny_runs["qtdog"]), load_run_model(tiny_runs["erm0"])
    dataset = qtdog.load_dataset()
    members = [qtdog.model, erm.model]
    results = eoq.evaluate_ensemble(members, dataset, ["id_val", "test"], "cpu", 256)
    for split in ("id_val", "test"):
        outs = [predict(m, eval_loader(dataset, split, m, 64)) for m in members]
        (la, y, meta), (lb, _, _) = outs
        assert not torch.allclose(la, lb)  # the members really differ
        expected = split_metrics(dataset, split, (la + lb) / 2, y, meta)
        got = {k: v for k, v in results["ensemble"].items() if k.startswith(f"{split}/")}
        assert got and got == pytest.approx(expected)
    best = json.loads((tiny_runs["qtdog"] / "final.json").read_text())["best"]
    assert results["members"][0]["test/acc_avg"] == pytest.approx(best["test/acc_avg"], abs=1e-6)


def test_size_report_counts_every_member_against_one_fp_model(tiny_runs):
    model = load_run_model(tiny_runs["qtdog"]).model
    size = ensemble_size([model, model, model])
    report = compression_report(model)
    assert size.members == 3
    assert size.ensemble_packed_mb == pytest.approx(3 * report.packed_bytes / 2**20)
    assert size.fp_model_mb == pytest.approx(report.fp32_bytes / 2**20)
    assert size.ensemble_over_fp < 1.0  # three 7-bit members are smaller than one FP32 model


def test_dgq_eoq_trained_members_and_wrote_results(tiny_runs):
    summary = json.loads((tiny_runs["eoq"] / "eoq.json").read_text())
    finals = [json.loads((tiny_runs[f"erm{i}"] / "final.json").read_text()) for i in range(2)]
    assert [f["seed"] for f in finals] == [0, 1]
    for member, final in zip(summary["member_results"], finals):
        assert member["test/acc_avg"] == pytest.approx(final["best"]["test/acc_avg"], abs=1e-6)
    assert set(summary["splits"]) == {"id_val", "test", "val"}
    # The ensemble's accuracy comes from the mean logits, recomputed here from the export.
    ensemble = eoq.load_eoq_model(tiny_runs["eoq"] / "eoq_model.pt")
    loaded = load_run_model(tiny_runs["erm0"])
    dataset = loaded.load_dataset()
    logits, y, _ = predict(ensemble, eval_loader(dataset, "test", loaded.model))
    assert (logits.argmax(1) == y).float().mean().item() == pytest.approx(summary["ensemble"]["test/acc_avg"])
    members = [load_run_model(tiny_runs[f"erm{i}"]).model for i in range(2)]
    manual = torch.stack([predict(m, eval_loader(dataset, "test", m))[0] for m in members]).mean(0)
    assert torch.allclose(logits, manual, atol=1e-5)


def test_finished_members_are_reused_and_runs_can_be_ensembled(tiny_runs, tmp_path, capsys):
    before = (tiny_runs["erm0"] / "final.json").stat().st_mtime_ns
    reuse = tmp_path / "reuse"
    reuse.mkdir()
    for i in range(2):
        (reuse / f"member{i}").symlink_to(tiny_runs[f"erm{i}"], target_is_directory=True)
    rc = eoq.main(["--members", "2", "--log_dir", str(reuse), "--splits", "test", "--", "--n_steps", "30"])
    assert rc == 0
    assert (reuse / "eoq.json").is_file()
    assert (tiny_runs["erm0"] / "final.json").stat().st_mtime_ns == before
    rc = eoq.main(
        [
            "--from_runs",
            str(tiny_runs["qtdog"]),
            str(tiny_runs["qtdog"]),
            "--log_dir",
            str(tmp_path),
            "--splits",
            "test",
        ]
    )
    assert rc == 0
    summary = json.loads((tmp_path / "eoq.json").read_text())
    assert summary["ensemble"]["test/acc_avg"] == pytest.approx(summary["member_results"][0]["test/acc_avg"])
    assert "EoQ of 2" in capsys.readouterr().out


def test_bad_eoq_input_is_a_one_line_error(tiny_runs, tmp_path, capsys):
    assert eoq.main(["--log_dir", str(tmp_path), "--", "--seed", "3"]) == 2
    assert "--seed is set by dgq_eoq" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    for name in ("best_model.pt", "final.json"):
        (other / name).write_bytes((tiny_runs["erm1"] / name).read_bytes())
    state = torch.load(other / "best_model.pt", weights_only=False)
    state["config"]["test_domain"] = "rot0"
    torch.save(state, other / "best_model.pt")
    assert eoq.main(["--from_runs", str(tiny_runs["erm0"]), str(other), "--log_dir", str(tmp_path / "e")]) == 2
    assert "differs" in capsys.readouterr().err


@pytest.mark.slow
def test_parallel_members_train_in_separate_processes(tmp_path):
    rc = eoq.main(
        [
            "--members",
            "2",
            "--parallel",
            "2",
            "--seeds",
            "5",
            "6",
            "--devices",
            "cpu",
            "--log_dir",
            str(tmp_path),
            "--splits",
            "test",
            "--",
            "--n_steps",
            "6",
            "--eval_every",
            "3",
            "--batch_size",
            "32",
        ]
    )
    assert rc == 0
    finals = [json.loads((tmp_path / f"member{i}" / "final.json").read_text()) for i in range(2)]
    assert [f["seed"] for f in finals] == [5, 6] and all(f["steps"] == 6 for f in finals)
    assert json.loads((tmp_path / "eoq.json").read_text())["size"]["members"] == 2
