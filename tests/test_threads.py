"""The default CPU thread count leaves busy cores to their owners."""

from __future__ import annotations

import os

import pytest
import torch

from dg_quant import threads
from dg_quant.errors import ConfigError


@pytest.fixture
def machine(monkeypatch):
    """A machine with ``cpus`` CPUs for this process and a one-minute load of ``load``."""

    def set_machine(cpus: int, load: float) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))

    return set_machine


@pytest.mark.parametrize(
    ("cpus", "load", "expected"), [(2, 3.5, 1), (2, 0.2, 2), (16, 0.3, 16), (16, 6.2, 10), (4, 1.6, 2)]
)
def test_default_is_the_idle_share_of_the_cpus(machine, cpus, load, expected) -> None:
    machine(cpus, load)
    assert threads.default_threads({}) == expected


def test_omp_num_threads_wins(machine) -> None:
    machine(16, 0.0)
    assert threads.default_threads({"OMP_NUM_THREADS": "3"}) == 3
    assert threads.default_threads({"OMP_NUM_THREADS": "junk"}) == 16


def test_threads_flag_sets_torch(machine) -> None:
    before = torch.get_num_threads()
    try:
        machine(2, 5.0)
        assert threads.apply_threads(None) == torch.get_num_threads() == int(os.environ.get("OMP_NUM_THREADS", 1))
        assert threads.apply_threads(2) == torch.get_num_threads() == 2
        with pytest.raises(ConfigError, match="--threads must be at least 1"):
            threads.apply_threads(0)
    finally:
        torch.set_num_threads(before)


def test_a_run_resumes_with_another_thread_count(tmp_path, capsys) -> None:
    from dg_quant.adapters.wilds.cli import main

    before = torch.get_num_threads()
    try:
        common = ["--n_steps", "6", "--eval_every", "3", "--no_progress", "--log_dir", str(tmp_path / "r")]
        assert main([*common, "--threads", "2"]) == 0
        (tmp_path / "r" / "final.json").unlink()  # as if killed after its last checkpoint
        assert main([*common, "--threads", "1", "--resume"]) == 0, capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
