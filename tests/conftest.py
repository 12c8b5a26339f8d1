"""Shared test set-up: offline, deterministic, small."""

from __future__ import annotations

import os
import sys

# Never let wilds start its network version check, and never reach a model hub.
sys.modules.setdefault("outdated", None)  # type: ignore[arg-type]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# --quant_kernels auto would compile the LSQ kernels (minutes on 2 cores) in every run the tests start.
os.environ.setdefault("DG_QUANT_QUANT_KERNELS", "eager")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _default_run_folders() -> set[str]:
    runs = os.path.join(REPO, "runs")
    return set(os.listdir(runs)) if os.path.isdir(runs) else set()


@pytest.fixture(autouse=True, scope="session")
def _checkout_stays_clean():
    """Tests write their runs under tmp_path: none may leave a folder in the checkout's ``runs/``
    (where ``wilds_run`` puts a run without ``--log_dir``)."""
    before = _default_run_folders()
    yield
    left = sorted(_default_run_folders() - before)
    assert not left, f"tests left run folders in {os.path.join(REPO, 'runs')}: {', '.join(left)}; pass --log_dir"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def pacs_root(tmp_path_factory):
    """The real PACS extracted once per test session (``<root>/PACS/<domain>/<class>/*.jpg``)."""
    import tarfile

    from tests.assets import PACS_TAR

    if not PACS_TAR.is_file():
        pytest.skip(f"{PACS_TAR} not present")
    root = tmp_path_factory.mktemp("pacs")
    with tarfile.open(PACS_TAR) as tar:
        tar.extractall(root, filter="data")
    return root
