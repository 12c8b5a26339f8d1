"""Import ``wilds`` safely on a current, offline stack.

Shared by both hosts (the WILDS host, and DomainBed whose ``domainbed.datasets`` imports
``wilds``), so it belongs to neither host's package.

Two fixes: the import-time version check, a network request without timeout,
is disabled by making ``outdated`` unimportable for wilds; and group-wise metrics, which need
the source-only ``torch_scatter`` for one grouped mean, get that mean from plain torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

import torch


def avg_over_groups(v: torch.Tensor, g: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``v`` per group id in ``g`` (empty groups give 0) and the group counts."""
    counts = torch.zeros(n_groups, device=g.device, dtype=torch.float).index_add_(
        0, g, torch.ones_like(g, dtype=torch.float)
    )
    sums = torch.zeros(n_groups, device=v.device, dtype=v.dtype).index_add_(0, g, v)
    return sums / counts.clamp_min(1).to(v.dtype), counts


def import_wilds() -> ModuleType:
    """Import and return ``wilds`` with the version check off and metrics working."""
    if "wilds" not in sys.modules:
        blocked = "outdated" not in sys.modules
        if blocked:
            sys.modules["outdated"] = None  # type: ignore[assignment]  # wilds.version skips its thread
        try:
            import wilds
        finally:
            if blocked:
                del sys.modules["outdated"]
    wilds = sys.modules["wilds"]
    if importlib.util.find_spec("torch_scatter") is None:
        for name in (
            "wilds.common.utils",
            "wilds.common.metrics.metric",
            "wilds.common.metrics.all_metrics",
            "wilds.common.metrics.loss",
        ):
            importlib.import_module(name).avg_over_groups = avg_over_groups
    return wilds
