"""Model selection of a quantization method picks a quantized evaluation (dg_quant.selection)."""

from __future__ import annotations

import json

from dg_quant.adapters.wilds import cli, runner
from dg_quant.adapters.wilds.checkpoints import load_run_model
from dg_quant.analysis.tables import select_record
from dg_quant.quant import iter_quantized_weights
from dg_quant.selection import SELECTION_RULE


def test_qtdog_selects_a_quantized_evaluation_even_when_full_precision_validated_better(tmp_path, monkeypatch):
    real_evaluate = runner.Run.evaluate

    def evaluate(self):
        """The real evaluation, with a validation score that favours the full-precision model."""
        record = real_evaluate(self)
        record[self.config.val_metric] = 0.9 if not record["quantized"] else 0.5 + self.trainer.step / 1000
        return record

    monkeypatch.setattr(runner.Run, "evaluate", evaluate)
    log_dir = tmp_path / "qtdog"
    assert (
        cli.main(
            [
                "--plugin",
                "dg_quant.qtdog",
                "--quant_start_step",
                "4",
                "--n_steps",
                "8",
                "--eval_every",
                "2",
                "--batch_size",
                "32",
                "--frac",
                "0.3",
                "--log_dir",
                str(log_dir),
                "--no_progress",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in (log_dir / "results.jsonl").read_text().splitlines()]
    assert [r["quantized"] for r in records] == [False, False, True, True]  # switched on at step 4
    final = json.loads((log_dir / "final.json").read_text())
    assert final["best_step"] == 8 and final["best"]["quantized"] is True
    assert final["test_at_best"] == records[-1][final["test_metric"]] and final["selection"] == SELECTION_RULE
    best, _config, _ = load_run_model(log_dir, "best")
    quantizers = [q for *_, q in iter_quantized_weights(best)]
    assert quantizers and all(q.enabled for q in quantizers)  # best_model.pt is the quantized model


def test_tables_select_quantized_records_first():
    fp = {"step": 2, "quantized": False, "v": 0.9}
    late = {"step": 6, "quantized": True, "v": 0.5}
    early = {"step": 4, "quantized": True, "v": 0.5}
    assert select_record([fp, early, late], "training_domain", "v") is early  # ties: the earlier step
    erm = [{"step": 2, "quantized": False, "v": 0.4}, {"step": 4, "quantized": False, "v": 0.6}]
    assert select_record(erm, "training_domain", "v") is erm[1]  # never quantized: all records count
    domainbed = [{"step": 0, "quantized": 0.0, "v": 0.9}, {"step": 300, "quantized": 0.2, "v": 0.1}]
    assert select_record(domainbed, "training_domain", "v") is domainbed[1]  # a window fraction > 0
