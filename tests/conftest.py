"""Shared test set-up: offline, deterministic, small."""

from __future__ import annotations

import os
import sys

# Never let wilds start its network version check, and never reach a model hub.
sys.modules.setdefault("outdated", None)  # type: ignore[arg-type]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


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
