"""Tiny real runs shared by the analysis tests: two ERM members trained by ``dgq_eoq`` (seeds 0
and 1) and one QT-DoG run, all 30 steps on the embedded rotated digits."""

from __future__ import annotations

from pathlib import Path

import pytest

from dg_quant.adapters.wilds import cli, eoq

STEPS = ["--n_steps", "30", "--eval_every", "10", "--batch_size", "32"]


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    assert eoq.main(["--members", "2", "--log_dir", str(root / "eoq"), "--", *STEPS]) == 0
    qtdog = root / "qtdog_seed0"
    assert (
        cli.main(
            [
                "--plugin",
                "dg_quant.qtdog",
                "--quant_start_step",
                "10",
                "--seed",
                "0",
                "--log_dir",
                str(qtdog),
                "--no_progress",
                *STEPS,
            ]
        )
        == 0
    )
    return {
        "root": root,
        "eoq": root / "eoq",
        "erm0": root / "eoq" / "member0",
        "erm1": root / "eoq" / "member1",
        "qtdog": qtdog,
    }
