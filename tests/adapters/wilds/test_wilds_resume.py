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
ARGS = ["--dataset", "image_folder", "--test_domain", "sketch", "--model", "test_cnn", "--image_size", "16",
        "--batch_size", "8", "--n_steps", "14", "--eval_every", "3", "--lr", "1e-2", "--seed", "3",
        "--plugin", "dg_quant.qtdog", "--bits", "4", "--quant_start_step", "5", "--no_progress", "--device", "cpu"]


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


def test_resume_refuses_other_settings(folder_root, tmp_path, capsys):
    argv = [*ARGS, "--root_dir", str(folder_root), "--log_dir", str(tmp_path), "--n_steps", "3"]
    assert main(argv) == 0
    assert main([*argv, "--resume", "--seed", "4"]) == 2
    assert "written with seed=3, this run has 4" in capsys.readouterr().err
