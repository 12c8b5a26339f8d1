"""Which evaluation a model selection may pick: a quantization method's must be a quantized one.

QT-DoG switches quantization on mid-run; its best in-domain validation can come before the
switch, and picking that evaluation would report (and save) a full-precision model as the
quantized method's result. Every record says whether the evaluated model was ``quantized``
(``wilds_run``: a bool; DomainBed: the fraction of the checkpoint window's steps run quantized,
> 0 once the switch happened, since quantization never switches off again). Selection ranks
quantized evaluations above full-precision ones, then by validation, ties to the earlier step:
a run that was ever quantized selects among its quantized evaluations only, and a run that was
never quantized (ERM) among all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SELECTION_RULE = (
    "best validation among the quantized evaluations when the run has any "
    "(a quantization method's selected model is a quantized one), else among all"
)


def is_quantized_record(record: Mapping[str, Any]) -> bool:
    """Was this evaluation made on the quantized model?"""
    return bool(record.get("quantized") or 0)


def selection_key(record: Mapping[str, Any], metric: str) -> tuple[bool, float, int]:
    """Sort key of a record for selection by ``metric`` (max wins; equal metrics: earlier step)."""
    return (is_quantized_record(record), float(record[metric]), -int(record.get("step", 0)))


def replaces_selected(record: Mapping[str, Any], selected: Mapping[str, Any] | None, metric: str) -> bool:
    """Does a new evaluation ``record`` replace the ``selected`` one (None: nothing selected yet)?"""
    return selected is None or selection_key(record, metric) > selection_key(selected, metric)
