"""``torchrun --nproc_per_node 2 wilds_run``: data-parallel runs (gloo on the CPU) match one process.

The model normalises per sample (GroupNorm), so two processes with half the batch each compute
what one process computes on the whole batch; the metrics agree within float tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dg_quant.adapters.wilds import distributed
from dg_quant.adapters.wilds.cli import main, parse_config
from dg_quant.adapters.wilds.runner import run
from dg_quant.errors import ConfigError
from tests.adapters.wilds.test_wilds_resume import Kill

TESTS = Path(__file__).parents[2]
# 32 digits a step on 1 or 2 processes, evaluated at steps 3 and 6
ARGS = ["--batch_size", "32", "--n_steps", "6", "--eval_every", "3", "--seed", "1", "--no_progress", "--device", "cpu"]
QTDOG = ["--plugin", "dg_quant.qtdog", "--bits", "4", "--quant_start_step", "2"]
TOLERANCE = 1e-5
MODEL = "tests.user_backbone:groupnorm_cnn"


def torchrun(log_dir: Path, *args: str, nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone`` (a free port) on wilds_run's module."""
    # the tests folder for plugins named by module (ddp_drift), the repository root for the model, which
    # is named as in the one-process runs (a resumed run must name it the same way)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    command += ["-m", "dg_quant.adapters.wilds.cli", "--model", MODEL, *ARGS, *args]
    command += ["--log_dir", str(log_dir)]
    done = subprocess.run(command, cwd=log_dir.parent, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 or not check, done.stderr[-3000:]
    return done


def one_process(log_dir: Path, *args: str) -> None:
    assert main(["--model", MODEL, *ARGS, *args, "--log_dir", str(log_dir)]) == 0


def records(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "results.jsonl").read_text().splitlines()]


def assert_same_run(one: Path, two: Path, tolerance: float = TOLERANCE, acc_tolerance: float | None = None) -> None:
    """Same records (keys, steps, every metric within ``tolerance``, accuracies within
    ``acc_tolerance``) and the same final weights."""
    a, b = records(one), records(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 6]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key, value in ra.items():
            if isinstance(value, float):
                limit = acc_tolerance if acc_tolerance is not None and "/acc" in key else tolerance
                assert rb[key] == pytest.approx(value, abs=limit), key
            else:
                assert rb[key] == value, key
    wa = torch.load(one / "model.pt", weights_only=False)["model"]
    wb = torch.load(two / "model.pt", weights_only=False)["model"]
    assert wa.keys() == wb.keys()
    for key, value in wa.items():
        if isinstance(value, torch.Tensor):
            assert torch.allclose(value, wb[key], atol=tolerance), key


@pytest.mark.slow
def test_qtdog_on_two_processes_matches_one_process(tmp_path) -> None:
    one_process(tmp_path / "one", *QTDOG)
    done = torchrun(tmp_path / "two", *QTDOG)
    assert_same_run(tmp_path / "one", tmp_path / "two")
    assert records(tmp_path / "two")[-1]["quantized"] is True
    assert done.stdout.count("-- last step") == 1  # rank 0 alone reports
    final = json.loads((tmp_path / "two" / "final.json").read_text())
    assert final["test_at_best"] == pytest.approx(
        json.loads((tmp_path / "one" / "final.json").read_text())["test_at_best"]
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "tolerance", "acc_tolerance"),
    [
        ([], TOLERANCE, None),  # ERM
        (["--plugin", "dg_quant.sagm"], TOLERANCE, None),  # two synchronised backward passes per step
        (["--plugin", "dg_quant.fqat", "--bits", "4", "--freeze_steps", "2", "--act_bits", "0"], TOLERANCE, None),
        # activation steps initialised from the gathered global batch (LSQ rule). Rounding activations
        # turns float noise of the sharded gradient sums (~1e-7) into a whole quantization level now
        # and then, which can flip a near-tie prediction: accuracies may differ by a couple of examples.
        ([*QTDOG, "--act_bits", "8", "--act_init", "lsq"], 1e-3, 0.01),
        (["--plugin", "dg_quant.fqat", "--bits", "4", "--freeze_steps", "2", "--act_init", "lsq"], 1e-3, 0.01),
    ],
    ids=["erm", "sagm", "fqat", "qtdog_act", "fqat_act"],
)
def test_methods_on_two_processes_match_one_process(tmp_path, method, tolerance, acc_tolerance) -> None:
    one_process(tmp_path / "one", *method)
    torchrun(tmp_path / "two", *method)
    assert_same_run(tmp_path / "one", tmp_path / "two", tolerance, acc_tolerance)


@pytest.mark.slow
def test_a_run_killed_on_one_process_resumes_on_two(tmp_path) -> None:
    """--resume under torchrun: every process loads last.pt (mid-epoch data order, RNG, quantizers)."""
    one_process(tmp_path / "full", *QTDOG)
    config, host = parse_config(["--model", MODEL, *ARGS, *QTDOG, "--log_dir", str(tmp_path / "two")])
    host.register(Kill(5))
    with pytest.raises(KeyboardInterrupt):
        run(config, host)
    torchrun(tmp_path / "two", *QTDOG, "--resume")
    assert_same_run(tmp_path / "full", tmp_path / "two")


@pytest.mark.slow
def test_a_batchnorm_model_trains_on_two_processes(tmp_path) -> None:
    """Each process updates BN running statistics from its share; rank 0's are kept (as DDP does)."""
    torchrun(tmp_path / "bn", "--model", "digits_cnn")
    assert [r["step"] for r in records(tmp_path / "bn")] == [3, 6]


@pytest.mark.slow
def test_processes_whose_state_drifts_apart_stop_in_one_line(tmp_path) -> None:
    done = torchrun(tmp_path / "drift", "--plugin", "ddp_drift", check=False)
    assert done.returncode != 0
    assert "wilds_run: error: step 3: the processes hold different model " in done.stderr
    assert not (tmp_path / "drift" / "results.jsonl").exists()  # nothing written from a drifted state


# -- the pieces, in one process -------------------------------------------------------------


def test_rank_slices_deal_out_the_global_batch() -> None:
    batches = [list(range(8)), list(range(8, 16))]
    slices = [list(distributed.RankSlice(batches, distributed.Processes(r, 2, r))) for r in range(2)]
    for g, batch in enumerate(batches):
        assert sorted(slices[0][g] + slices[1][g]) == batch
        assert len(slices[0][g]) == len(slices[1][g]) == 4
    assert len(distributed.RankSlice(batches, distributed.Processes(1, 2, 1))) == 2


def test_group_loader_shards_keep_the_groups_of_the_global_batch() -> None:
    """WILDS' group sampler draws --n_groups_per_batch groups per global batch; the shards split it."""
    from wilds.common.data_loaders import get_train_loader
    from wilds.common.grouper import CombinatorialGrouper

    from dg_quant.adapters.wilds.datasets import load_dataset

    config, _ = parse_config(["--n_steps", "1"])
    dataset = load_dataset(config)
    grouper = CombinatorialGrouper(dataset, ["domain"])
    train = dataset.get_subset("train")
    loader = get_train_loader("group", train, grouper=grouper, n_groups_per_batch=2, batch_size=16)
    np.random.seed(0)
    torch.manual_seed(0)
    whole = [list(b) for _, b in zip(range(3), loader.batch_sampler)]
    shares = []
    for rank in range(2):
        np.random.seed(0)
        torch.manual_seed(0)
        shard = distributed.shard_loader(loader, distributed.Processes(rank, 2, rank))
        shares.append([list(b) for _, b in zip(range(3), shard.batch_sampler)])
    for g, batch in enumerate(whole):
        assert sorted(shares[0][g] + shares[1][g]) == sorted(batch)
        groups = grouper.metadata_to_group(train.metadata_array[batch]).unique()
        assert len(groups) == 2


def test_global_batch_must_divide_among_processes() -> None:
    with pytest.raises(ConfigError, match="--batch_size 30 .* among 4 processes"):
        distributed.check_batch_size(30, distributed.Processes(0, 4, 0))
    distributed.check_batch_size(32, distributed.Processes(0, 4, 0))


def test_process_layout_from_torchrun_environment() -> None:
    assert distributed.from_environment({}) == distributed.Processes(0, 1, 0)
    procs = distributed.from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (procs.rank, procs.world_size, procs.local_rank, procs.is_main, procs.parallel) == (3, 4, 1, False, True)
    with pytest.raises(ConfigError, match="start the run with torchrun"):
        distributed.from_environment({"RANK": "4", "WORLD_SIZE": "4"})


def test_fingerprint_sees_any_change_of_state() -> None:
    state = {"model": {"w": torch.ones(3)}, "plugins": {"fqat": {"frozen": {"a": torch.tensor([True, False])}}}}
    same = {"plugins": {"fqat": {"frozen": {"a": torch.tensor([True, False])}}}, "model": {"w": torch.ones(3)}}
    assert distributed.fingerprint(state) == distributed.fingerprint(same)
    flipped = {**state, "plugins": {"fqat": {"frozen": {"a": torch.tensor([True, True])}}}}
    assert distributed.fingerprint(flipped) != distributed.fingerprint(state)
    nudged = {**state, "model": {"w": torch.tensor([1.0, 1.0, 1.0 + 1e-7])}}
    assert distributed.fingerprint(nudged) != distributed.fingerprint(state)


def test_one_process_needs_no_process_group() -> None:
    one = distributed.Processes()
    model = torch.nn.Linear(2, 2)
    assert distributed.data_parallel(model, one, torch.device("cpu")) is model
    window = [{"loss": torch.tensor(1.5)}]
    assert distributed.average_metrics(window, one, torch.device("cpu")) is window
    distributed.check_in_step({"model": model.state_dict()}, one, 0)  # nothing to compare with
