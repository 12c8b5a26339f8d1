"""What the launcher's ``collect_results`` reads: DomainBed's records, with three dg-quant rules.

- A run (one ``output_dir``) with any quantized evaluation (``quantized`` > 0: QT-DoG after its
  switch, INQ once every weight is frozen, OBC's appended post-training record) keeps only its
  quantized records, so every selection method picks a quantized model for a quantization
  method (``dg_quant.selection``). Runs that were never quantized (ERM, SAGM) keep all.
- A run whose model was replaced by its final model (``dgq_final_model`` > 0: SWAD's average,
  evaluated by ``train.py`` at the last step) keeps only the records of that model, so every
  selection method reports the averaged model, not an online checkpoint.
- A run trained with ``--no_pretrained`` (hparam ``dgq_random_init``) is listed under
  ``"<algorithm> (random init)"``, never mixed with runs from ImageNet weights.

DomainBed's own ``python -m domainbed.scripts.collect_results`` applies neither rule.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

from dg_quant.selection import is_quantized_record

RANDOM_INIT_HPARAM = "dgq_random_init"  # set in --hparams by the launcher's --no_pretrained
RANDOM_INIT_SUFFIX = " (random init)"
FINAL_MODEL_KEY = "dgq_final_model"  # 1.0 in the records of a run's final (averaged) model


def is_final_model_record(record: dict[str, Any]) -> bool:
    return float(record.get(FINAL_MODEL_KEY) or 0.0) > 0.0


def _run_key(record: dict[str, Any]) -> str:
    args = record.get("args") or {}
    return str(args.get("output_dir") or sorted(args.items()))


def selectable_records(records: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], int, int, int]:
    """(records to select from, full-precision records left out, online-model records left out,
    random-init records renamed)."""
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        runs[_run_key(record)].append(record)
    kept, dropped, online, renamed = [], 0, 0, 0
    for run in runs.values():
        if any(is_quantized_record(r) for r in run):
            dropped += sum(not is_quantized_record(r) for r in run)
            run = [r for r in run if is_quantized_record(r)]
        if any(is_final_model_record(r) for r in run):
            online += sum(not is_final_model_record(r) for r in run)
            run = [r for r in run if is_final_model_record(r)]
        for record in run:
            if (record.get("hparams") or {}).get(RANDOM_INIT_HPARAM):
                args = record["args"]
                record = {**record, "args": {**args, "algorithm": args["algorithm"] + RANDOM_INIT_SUFFIX}}
                renamed += 1
            kept.append(record)
    return kept, dropped, online, renamed


def _load_records(load: Callable[[str], Any], path: str) -> Any:
    records = load(path)
    kept, dropped, online, renamed = selectable_records(records)
    print(
        f"dg-quant: {dropped} full-precision evaluations of runs that were quantized later left out of "
        f"model selection; {online} evaluations of online models of runs with a final averaged model (SWAD) "
        f"left out; {renamed} records of --no_pretrained runs listed as '<algorithm>{RANDOM_INIT_SUFFIX}'"
    )
    return type(records)(kept)


def filter_collected_records(reporting: ModuleType) -> None:
    """Make ``reporting.load_records`` (what ``collect_results`` calls) apply the rules above."""
    load = getattr(reporting.load_records, "_dgq_original", reporting.load_records)
    wrapped = functools.partial(_load_records, load)
    wrapped._dgq_original = load  # type: ignore[attr-defined]
    reporting.load_records = wrapped
