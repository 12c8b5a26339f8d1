"""Stability curves (Fig. 4) from results.jsonl."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dg_quant.adapters.wilds.run_results import read_run
from dg_quant.analysis.stability import stability_frame, stability_summary
from dg_quant.errors import DataError
from dg_quant.io import read_jsonl


def test_frame_reads_every_evaluation(tiny_runs):
    runs = [tiny_runs["erm0"], tiny_runs["qtdog"]]
    frame = stability_frame([read_run(r) for r in runs], labels=["erm", "qtdog"])
    for label, run in zip(["erm", "qtdog"], runs):
        records = read_jsonl(run / "results.jsonl")
        part = frame[frame.label == label]
        assert part["step"].tolist() == [r["step"] for r in records] == [10, 20, 30]
        assert part["ood"].tolist() == [r["test/acc_avg"] for r in records]
        assert part["id_val"].tolist() == [r["id_val/acc_avg"] for r in records]
    with pytest.raises(DataError):
        stability_frame([read_run(r) for r in runs], labels=["one"])
    with pytest.raises(DataError):
        stability_frame([read_run(r) for r in runs], ood_metric="test/nothing")


def test_summary_numbers():
    frame = pd.DataFrame(
        {
            "label": ["a"] * 4,
            "run": ["r"] * 4,
            "step": [1, 2, 3, 4],
            "id_val": [0.5, 0.9, 0.7, 0.8],
            "ood": [0.2, 0.4, 0.6, 0.3],
        }
    )
    row = stability_summary(frame).iloc[0]
    assert row["ood_at_best_id_val"] == 0.4 and row["ood_max"] == 0.6
    assert row["selection_gap"] == pytest.approx(0.2)
    assert row["ood_std"] == pytest.approx(np.std([0.2, 0.4, 0.6, 0.3]))
    assert row["id_ood_corr"] == pytest.approx(np.corrcoef([0.5, 0.9, 0.7, 0.8], [0.2, 0.4, 0.6, 0.3])[0, 1])
    assert stability_summary(frame, after_step=3).iloc[0]["evals"] == 2
