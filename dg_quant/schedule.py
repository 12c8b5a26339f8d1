"""QT-DoG's published switch-on schedule, which hosts need to set their default hyperparameters.

It sits in the core, not in the ``dg_quant.qtdog`` plugin, because the DomainBed host reads it to
build its ``quant_start_step`` search space and hosts never import a plugin.
"""

from __future__ import annotations

PAPER_START_STEP = 2000
PAPER_TOTAL_STEPS = 5000
# QT-DoG's switch-on step and run length per dataset (appendix: 8,000 of 15,000 steps on
# DomainNet, 2,000 of 5,000 on the others). Keys are dataset names in lower case without
# separators, so WILDS' "domainnet" and DomainBed's "DomainNet" both match.
PAPER_SCHEDULES: dict[str, tuple[int, int]] = {"domainnet": (8000, 15000)}


def _dataset_key(dataset: str | None) -> str:
    return "".join(c for c in str(dataset or "").lower() if c.isalnum())


def paper_start_step(dataset: str | None, total_steps: int | None) -> int:
    """QT-DoG's switch-on step for ``dataset``, scaled down for a run shorter than the paper's."""
    start, total = PAPER_SCHEDULES.get(_dataset_key(dataset), (PAPER_START_STEP, PAPER_TOTAL_STEPS))
    if total_steps is not None and total_steps < total:
        return round(total_steps * start / total)
    return start
