"""A user's own backbone through the documented route: train -> export (a fresh process) -> EoQ.

The user's module lives outside the project (a folder put on ``PYTHONPATH``, as docs/backbones.md
says) and wraps a torchvision network the project has no adapter for (SqueezeNet 1.1), loading
the user's own weights file. ``--model my_nets:squeezenet`` trains it on the real PACS subset; the
export runs as the installed ``dgq_export`` script in a new process, which knows the backbone only
from the name stored in the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import squeezenet1_1

from dg_quant.adapters.wilds import eoq
from tests.e2e.conftest import read_json, wilds_run

USER_MODULE = '''
"""A user's backbones (not part of dg-quant)."""
import torch
from torch import nn
from torchvision.models import squeezenet1_1
from torchvision.transforms import v2

from dg_quant.model import DGModel


def squeezenet(num_classes, weights=None, img_size=32):
    features = squeezenet1_1().features
    if weights is not None:
        features.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    featurizer = nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    transform = v2.Compose([v2.ToImage(), v2.RGB(), v2.Resize((img_size, img_size)),
                            v2.ToDtype(torch.float32, scale=True)])
    return DGModel(featurizer, nn.Linear(512, num_classes), 512, transform)
'''
MODEL = "my_nets:squeezenet"
SEEDS = (0, 1)


@pytest.fixture(scope="session")
def user_code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's folder: ``my_nets.py`` and a weights file of its features (seeded, saved as a user would)."""
    folder = tmp_path_factory.mktemp("user_code")
    (folder / "my_nets.py").write_text(textwrap.dedent(USER_MODULE))
    torch.manual_seed(2024)
    torch.save(squeezenet1_1().features.state_dict(), folder / "squeezenet_features.pt")

    return folder


@pytest.fixture(scope="session")
def user_runs(user_code: Path, pacs_mini: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """QT-DoG on PACS with the user's backbone, two seeds (the EoQ members)."""
    root = tmp_path_factory.mktemp("user_runs")
    runs = [root / f"seed{seed}" for seed in SEEDS]
    sys.path.insert(0, str(user_code))  # what PYTHONPATH does for the console scripts
    try:
        for seed, run in zip(SEEDS, runs):
            wilds_run(
                [
                    "--dataset",
                    "pacs",
                    "--root_dir",
                    str(pacs_mini),
                    "--test_domain",
                    "sketch",
                    "--model",
                    MODEL,
                    "--weights",
                    str(user_code / "squeezenet_features.pt"),
                    "--image_size",
                    "32",
                    "--n_steps",
                    "4",
                    "--eval_every",
                    "2",
                    "--batch_size",
                    "16",
                    "--plugin",
                    "dg_quant.qtdog",
                    "--bits",
                    "6",
                    "--quant_start_step",
                    "2",
                    "--seed",
                    str(seed),
                    "--log_dir",
                    str(run),
                    "--no_progress",
                    "--device",
                    "cpu",
                ]
            )
    finally:
        sys.path.remove(str(user_code))
        sys.modules.pop("my_nets", None)
    return runs


def test_user_backbone_trains_from_the_users_weights(user_runs, user_code):
    final = read_json(user_runs[0] / "final.json")
    assert final["model"] == MODEL and final["last"]["quantized"] is True
    # every convolution of SqueezeNet 1.1's features is quantized; the user's linear head stays FP
    convs = sum(isinstance(m, nn.Conv2d) for m in squeezenet1_1().features.modules())
    assert final["compression"]["quantized_layers"] == convs == 25
    assert {layer["bits"] for layer in final["compression"]["layers"]} == {6}
    # training started from the user's file: 4 Adam steps at lr 5e-5 moved the first conv by < 1e-3
    saved = torch.load(user_code / "squeezenet_features.pt", weights_only=True)["0.weight"]
    state = torch.load(user_runs[0] / "model.pt", weights_only=False)["model"]
    trained = state["featurizer.0.0.parametrizations.weight.original"]
    assert (trained - saved).abs().max() < 1e-3 < 0.05 < saved.abs().max()


def test_installed_dgq_export_rebuilds_the_user_backbone_in_a_new_process(user_runs, user_code, tmp_path):
    out = tmp_path / "user.dgq"
    script = Path(sys.executable).with_name("dgq_export")
    env = {**os.environ, "PYTHONPATH": str(user_code), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(script), str(user_runs[0]), "-o", str(out), "--checkpoint", "last", "--verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "verified: outputs equal" in done.stdout


def test_eoq_of_user_backbone_runs(user_runs, user_code, tmp_path):
    sys.path.insert(0, str(user_code))
    try:
        assert eoq.main(["--from_runs", *map(str, user_runs), "--log_dir", str(tmp_path / "eoq")]) == 0
        summary = read_json(tmp_path / "eoq" / "eoq.json")
        model = eoq.load_eoq_model(tmp_path / "eoq" / "eoq_model.pt")
    finally:
        sys.path.remove(str(user_code))
        sys.modules.pop("my_nets", None)
    assert summary["size"]["members"] == 2
    members = [read_json(r / "final.json")["best"] for r in user_runs]
    for member, best in zip(summary["member_results"], members):
        assert member["test/acc_avg"] == pytest.approx(best["test/acc_avg"], abs=1e-6)
    assert len(model.members) == 2 and model.transform is not None
