"""A ``--frac`` run is scored on the same examples by every command (``SubsetSpec``).

WILDS samples ``get_subset(frac=...)`` from numpy's global generator; before ``SubsetSpec``,
``dgq_ptq``/``dgq_eoq``/``dgq_analyze`` scored a quick run on other examples than the run did.
"""

from __future__ import annotations

import json

import numpy as np

from dg_quant.adapters.wilds import cli, eoq
from dg_quant.adapters.wilds.checkpoints import evaluate_splits, load_run_model
from dg_quant.adapters.wilds.datasets import SubsetSpec

SPLITS = ("id_val", "val", "test")


def _run(log_dir, seed: int) -> None:
    argv = ["--n_steps", "6", "--eval_every", "6", "--batch_size", "32", "--frac", "0.4", "--seed", str(seed)]
    assert cli.main([*argv, "--log_dir", str(log_dir), "--no_progress"]) == 0


def test_post_training_commands_score_a_frac_run_on_the_runs_own_examples(tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for seed, run in enumerate(runs):
        _run(run, seed)
    loaded = load_run_model(runs[0], "last")
    dataset = loaded.load_dataset()
    subsets = SubsetSpec.of(loaded.config)
    assert subsets == SubsetSpec(0.4, 0)
    first = subsets.subset(dataset, "test")
    np.random.seed(123)  # whatever drew from numpy's generator before does not change the subset
    assert np.array_equal(subsets.subset(dataset, "test").indices, first.indices)
    assert len(first) < len(dataset.get_subset("test"))

    last = json.loads((runs[0] / "final.json").read_text())["last"]
    metrics = evaluate_splits(loaded.model, dataset, SPLITS, subsets=subsets)
    for split in SPLITS:
        assert metrics[f"{split}/acc_avg"] == last[f"{split}/acc_avg"], split

    assert eoq.main(["--from_runs", *map(str, runs), "--which", "last", "--log_dir", str(tmp_path / "eoq")]) == 0
    summary = json.loads((tmp_path / "eoq" / "eoq.json").read_text())
    for member, run in zip(summary["member_results"], runs):
        recorded = json.loads((run / "final.json").read_text())["last"]
        assert member["test/acc_avg"] == recorded["test/acc_avg"]
