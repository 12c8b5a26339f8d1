"""A run killed mid-way and resumed with ``--resume`` ends exactly like an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

from dg_quant.adapters.wilds.cli import main, parse_config
from dg_quant.adapters.wilds.runner import run
from dg_quant.hookimpl import hookimpl

# 32 training images / batch 8 = 4 steps per epoch; checkpoints at steps 3, 6, 9, 12 and 14.
# DomainBed's random augmentation and QT-DoG switching on at step 5 make the RNG and the
# quantizer state matter.
ARGS = [
    "--dataset",
    "image_folder",
    "--test_domain",
    "sketch",
    "--model",
    "test_cnn",
    "--image_size",
    "16",
    "--batch_size",
    "8",
    "--n_steps",
    "14",
    "--eval_every",
    "3",
    "--lr",
    "1e-2",
    "--seed",
    "3",
    "--plugin",
    "dg_quant.qtdog",
    "--bits",
    "4",
    "--quant_start_step",
    "5",
    "--no_progress",
    "--device",
    "cpu",
]


class Kill:
    """Interrupts training as Ctrl-C would, before the given step."""

    def __init__(self, at: int) -> None:
        self.at = at

    @hookimpl
    def dgq_step_start(self, step: int) -> None:
        if step == self.at:
            raise KeyboardInterrupt


def _outputs(log_dir):
    records = (log_dir / "results.jsonl").read_text().splitlines()
    final = json.loads((log_dir / "final.json").read_text())
    return [json.loads(r) for r in records], final, torch.load(log_dir / "model.pt", weights_only=False)["model"]


@pytest.fixture(scope="module")
def uninterrupted(folder_root, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("full")
    assert main([*ARGS, "--root_dir", str(folder_root), "--log_dir", str(log_dir)]) == 0
    return _outputs(log_dir)


# killed before step 10: resumes from step 9, mid-epoch; before step 13: from step 12, an epoch boundary
@pytest.mark.parametrize("kill_at", [10, 13])
def test_resume_reproduces_the_uninterrupted_run(folder_root, tmp_path, uninterrupted, kill_at):
    argv = [*ARGS, "--root_dir", str(folder_root), "--log_dir", str(tmp_path)]
    config, host = parse_config(argv)
    host.register(Kill(kill_at))
    with pytest.raises(KeyboardInterrupt):
        run(config, host)
    assert not (tmp_path / "final.json").exists()
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["trainer"]["step"] == kill_at - 1
    assert main(argv) == 2  # no silent overwrite of a killed run without --resume

    assert main([*argv, "--resume"]) == 0
    records, final, weights = _outputs(tmp_path)
    full_records, full_final, full_weights = uninterrupted
    assert records == full_records
    assert final["last"] == full_final["last"] and final["best"] == full_final["best"]
    assert final["test_at_best"] == full_final["test_at_best"]
    assert weights.keys() == full_weights.keys()
    for key, value in weights.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, full_weights[key]), key
    assert final["last"]["quantized"] is True


@pytest.fixture(scope="module")
def short_run(folder_root, tmp_path_factory):
    """A finished 3-step 4-bit QT-DoG run (quantized from step 2)."""
    log_dir = tmp_path_factory.mktemp("short")
    argv = [
        *ARGS,
        "--root_dir",
        str(folder_root),
        "--log_dir",
        str(log_dir),
        "--n_steps",
        "3",
        "--quant_start_step",
        "2",
    ]
    assert main(argv) == 0
    return argv, log_dir


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--seed", "4"], "written with seed=3, this run has 4"),
        (["--bits", "5"], "written with bits=4, this run has 5"),
        (["--lr", "0.5"], "written with lr=0.01, this run has 0.5"),
        (["--n_steps", "6"], "written with n_steps=3, this run has 6"),
    ],
)
def test_resume_refuses_a_changed_setting_and_keeps_the_run(short_run, capsys, change, message):
    argv, log_dir = short_run
    before = {n: (log_dir / n).read_bytes() for n in ("config.json", "final.json", "model.pt", "last.pt")}
    capsys.readouterr()
    assert main([*argv, "--resume", *change]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert {n: (log_dir / n).read_bytes() for n in before} == before  # config.json not rewritten


def test_resume_without_a_plugin_names_the_plugin(short_run, capsys):
    argv, log_dir = short_run
    without = [a for a in argv if a != "dg_quant.qtdog"]
    without.remove("--plugin")
    without = [a for a in without if a not in ("--bits", "4", "--quant_start_step", "5", "2")]
    capsys.readouterr()
    assert main([*without, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "resume with --plugin dg_quant.qtdog" in err and "delete" not in err


def test_resume_accepts_where_and_how_fast_settings(short_run, capsys):
    argv, log_dir = short_run
    final = (log_dir / "final.json").read_text()
    assert main([*argv, "--resume", "--num_workers", "0", "--eval_batch_size", "7", "--save_every", "2"]) == 0
    assert (log_dir / "final.json").read_text() == final


def test_resume_from_a_step_checkpoint_between_evaluations(folder_root, tmp_path, uninterrupted):
    """--save_every 2 writes last.pt at step 10, between the evaluations at 9 and 12; killed before
    step 11, the resumed run still ends bit-identical (the window's step losses travel along)."""
    argv = [*ARGS, "--root_dir", str(folder_root), "--log_dir", str(tmp_path), "--save_every", "2"]
    config, host = parse_config(argv)
    host.register(Kill(11))
    with pytest.raises(KeyboardInterrupt):
        run(config, host)
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["trainer"]["step"] == 10 and len(state["window"]) == 1
    assert main([*argv, "--resume"]) == 0
    records, final, weights = _outputs(tmp_path)
    full_records, full_final, full_weights = uninterrupted
    assert records == full_records
    for key, value in weights.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, full_weights[key]), key


def test_a_corrupt_image_stops_at_evaluation_keeps_the_training_and_resumes(
    make_image_folders, tmp_path, uninterrupted, capsys
):
    """An image that exists but cannot be decoded: one line naming it at the first evaluation that
    reads it, last.pt keeps the 3 steps done; once the file is replaced, --resume evaluates step 3
    first and ends exactly like the uninterrupted run."""
    root = make_image_folders(tmp_path / "data")
    image = root / "sketch" / "dog" / "3.png"
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 3])
    log_dir = tmp_path / "run"
    argv = [*ARGS, "--root_dir", str(root), "--log_dir", str(log_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(image) in err and "--resume" in err
    state = torch.load(log_dir / "last.pt", weights_only=False)
    assert state["trainer"]["step"] == 3 and state["pending_eval"] is True
    assert main([*argv, "--resume"]) == 2  # still broken: same line, nothing lost
    assert torch.load(log_dir / "last.pt", weights_only=False)["trainer"]["step"] == 3
    image.write_bytes(good)
    assert main([*argv, "--resume"]) == 0
    records, final, weights = _outputs(log_dir)
    assert records == uninterrupted[0]
    for key, value in weights.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, uninterrupted[2][key]), key
