"""DomainBed-style result tables from the runs' evaluation records.

The tables know no host: each host reads its own run folders into ``RunResult`` (and
``EnsembleResult``, ``dg_quant.results``) records (the WILDS host: ``dg_quant.adapters.wilds.run_results``).

One table per (selection rule, dataset): rows are methods, columns are test domains plus
``Avg``; a cell is ``mean +- standard error`` over seeds in percent. As DomainBed's
``collect_results`` does, the standard error is ``np.std(values) / sqrt(n)`` (population std),
``Avg`` is the mean of the column means, and a missing cell is ``X``.

Each cell reports the run's own ``test_metric`` (as its host recorded it): the
dataset's official metric as the WILDS presets set it (Amazon: ``test/10th_percentile_acc``),
``test/acc_avg`` for the DomainBed-layout datasets; ``--metric`` overrides it for every run.
The metric is named in each table's title, and runs reporting different metrics never share a table.

Selection rules (each picks one evaluation record per run; the table reports its test metric):

- ``training_domain``: the record with the best ``val_metric`` (training-domain validation,
  QT-DoG's rule; ``id_val/acc_avg`` by default) among the quantized records when the run has
  any (``dg_quant.selection``: a quantization method's selected model is a quantized one);
- ``last``: the last evaluation;
- ``oracle``: the record with the best held-out-domain validation of the reported metric
  (``val/acc_avg`` for ``test/acc_avg``), as the SWAD/QT-DoG code reports it, quantized records
  first as above; skipped for runs that never evaluated ``val``.

A run with a final model (``dg_quant.swad``, ``dg_quant.swa``: the ``phase: final_model`` record)
reports that model under every rule: the average stands for the run, as in SWAD's tables.

A row is one (method, backbone, bit widths, ``--by`` settings): runs that differ in any of these
are never merged. Several runs that agree on all of them and on the test domain and seed, e.g.
an lr sweep, are reduced to the one whose selection-rule validation is best. The row label names
the backbone and bit widths only where they vary within the table (``qtdog resnet50 w7``).

An ensemble (``EnsembleResult``, e.g. a ``dgq_eoq`` folder) adds a row ``EoQ <method>``: its members' own runs
count as usual, and the ensemble counts once (its seed is the members' seeds) under the rule its
members were picked by (``training_domain`` for best checkpoints, ``last`` for last ones).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from dg_quant.errors import DataError
from dg_quant.results import TEST_METRIC, EnsembleResult, RunResult
from dg_quant.selection import selection_key

SELECTIONS = ("training_domain", "last", "oracle")
# What tells two runs' rows apart besides the method (and the ``--by`` settings).
IDENTITY = ("model", "bits")


def _ensemble_rows(ensemble: EnsembleResult, metric: str | None, selections: Sequence[str]) -> list[dict]:
    info, rule = ensemble.info, ensemble.rule
    if rule not in selections:
        return []
    metric = metric or info["test_metric"]
    value = ensemble.metrics.get(metric)
    if value is None:
        return []
    env = info["test_env"] or _test_env([ensemble.metrics], metric)
    return [
        {
            **info,
            "run": ensemble.run,
            "method": f"EoQ {info['method']}",
            "seed": ensemble.seeds,
            "test_env": env,
            "selection": rule,
            "step": None,
            "val": ensemble.metrics.get(info["val_metric"]),
            "metric": metric,
            "value": float(value),
        }
    ]


def oracle_metric(metric: str) -> str:
    """The held-out-domain validation key of ``metric``: ``val/acc_avg`` for ``test/acc_avg``."""
    return "val/" + metric.split("/", 1)[-1]


def _test_env(records: list[dict[str, Any]], metric: str) -> str:
    """Test domains named in the records' per-group keys (``test/acc_domain:rot75``)."""
    split = metric.split("/", 1)[0]
    groups = sorted({k.split(":", 1)[1] for r in records for k in r if k.startswith(f"{split}/acc_") and ":" in k})
    return ",".join(groups) if groups else split


def select_record(
    records: list[dict[str, Any]], rule: str, val_metric: str, metric: str = TEST_METRIC
) -> dict[str, Any] | None:
    """The record ``rule`` picks; ties go to the earliest, as ``wilds_run``'s best checkpoint.

    A run whose plugin replaced the trained model by a final one (SWAD's or SWA's average, the
    record with ``phase: final_model``) is that model under every rule, as SWAD reports it.
    """
    final_model = [r for r in records if r.get("phase") == "final_model"]
    if final_model:
        key = _selection_key(rule, val_metric, metric)
        return final_model[-1] if key is None or final_model[-1].get(key) is not None else None
    if rule == "last":
        return records[-1] if records else None
    key = _selection_key(rule, val_metric, metric)
    if key is None:
        raise DataError(f"unknown selection rule {rule!r}; choose from {', '.join(SELECTIONS)}")
    scored = [r for r in records if r.get(key) is not None]
    if not scored:
        return None
    return max(scored, key=lambda r: selection_key(r, key))  # quantized evaluations first


def _selection_key(rule: str, val_metric: str, metric: str) -> str | None:
    return {"training_domain": val_metric, "oracle": oracle_metric(metric)}.get(rule)


ROW_KEYS = ["dataset", "metric", "method", *IDENTITY]


def collect(
    runs: Iterable[RunResult],
    ensembles: Iterable[EnsembleResult] = (),
    metric: str | None = None,
    selections: Sequence[str] = SELECTIONS,
) -> pd.DataFrame:
    """One row per (selection rule, run): the selected step, its validation and the reported metric
    (``metric``, or each run's own ``test_metric`` when None)."""
    rows = []
    for run in runs:
        info, records = dict(run.info), run.records
        if not records:
            continue
        reported = metric or info["test_metric"]
        info["test_env"] = info["test_env"] or _test_env(records, reported)
        for rule in selections:
            record = select_record(records, rule, info["val_metric"], reported)
            if record is None or record.get(reported) is None:
                continue
            val_key = _selection_key(rule, info["val_metric"], reported)
            rows.append(
                {
                    **info,
                    "selection": rule,
                    "step": record["step"],
                    "metric": reported,
                    "val": record.get(val_key) if val_key else None,
                    "value": float(record[reported]),
                }
            )
    for ensemble in ensembles:
        rows += _ensemble_rows(ensemble, metric, selections)
    columns = ["selection", *ROW_KEYS, "test_env", "seed", "run", "step", "val", "value", "val_metric"]
    frame = pd.DataFrame(rows, columns=columns)
    if frame.empty:
        named = repr(metric) if metric else "its test_metric"
        raise DataError(f"no run reports {named}; pick another --metric (e.g. test/acc_avg)")
    # One run per seed: the best validation among duplicates (e.g. a learning-rate sweep).
    frame = frame.sort_values(["val", "step"], ascending=[False, True], na_position="last")
    frame = frame.drop_duplicates(["selection", *ROW_KEYS, "test_env", "seed"], keep="first")
    frame["seed"] = frame["seed"].astype(str)
    return frame.sort_values(["selection", *ROW_KEYS, "test_env", "seed"]).reset_index(drop=True)


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """DomainBed's mean and standard error: ``np.std(values) / sqrt(n)`` (ddof 0)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std() / np.sqrt(len(arr)))


def summarize(frame: pd.DataFrame, scale: float = 100.0) -> pd.DataFrame:
    """Mean, standard error and seed count per (selection, dataset, metric, method, backbone, bits,
    test domain), in percent."""
    rows = []
    keys = ["selection", *ROW_KEYS, "test_env"]
    for key, group in frame.groupby(keys, sort=True):
        mean, err = mean_stderr(group["value"].to_numpy() * scale)
        rows.append({**dict(zip(keys, key)), "mean": mean, "stderr": err, "n": len(group)})
    return pd.DataFrame(rows, columns=keys + ["mean", "stderr", "n"])


def _row_labels(group: pd.DataFrame) -> pd.Series:
    """The method, followed by the backbone and bit widths where they vary within the table."""
    varying = [c for c in IDENTITY if group[c].nunique() > 1]
    return group[["method", *varying]].astype(str).agg(" ".join, axis=1)


def wide_tables(summary: pd.DataFrame, digits: int = 1) -> dict[tuple[str, str, str], pd.DataFrame]:
    """``{(selection, dataset, metric): table}`` of ``mean +- stderr`` strings with an ``Avg`` column."""
    tables = {}
    for (rule, dataset, metric), group in summary.groupby(["selection", "dataset", "metric"], sort=False):
        group = group.assign(label=_row_labels(group))
        envs = sorted(group["test_env"].unique())
        cells: dict[str, dict[str, str]] = {}
        for label in dict.fromkeys(group["label"]):
            row, means = {}, []
            for env in envs:
                hit = group[(group["label"] == label) & (group["test_env"] == env)]
                if hit.empty:
                    row[env], means = "X", means + [None]
                    continue
                mean, err = float(hit["mean"].iloc[0]), float(hit["stderr"].iloc[0])
                row[env] = f"{mean:.{digits}f} +- {err:.{digits}f}"
                means.append(mean)
            row["Avg"] = "X" if None in means else f"{np.mean(means):.{digits}f}"
            cells[label] = row
        table = pd.DataFrame.from_dict(cells, orient="index", columns=envs + ["Avg"])
        table.index.name = "method"
        tables[(rule, dataset, metric)] = table
    order = {rule: i for i, rule in enumerate(SELECTIONS)}
    return dict(sorted(tables.items(), key=lambda kv: (order.get(kv[0][0], len(order)), kv[0][1], kv[0][2])))


def _title(rule: str, dataset: str, metric: str) -> str:
    return f"{dataset}, {metric}, model selection: {rule.replace('_', '-')}"


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub pipe table (pandas' own ``to_markdown`` needs the optional ``tabulate``)."""
    head = [table.index.name or ""] + list(table.columns)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + [":---:"] * len(table.columns)) + "|"]
    for name, row in table.iterrows():
        lines.append("| " + " | ".join([str(name)] + [str(v) for v in row]) + " |")
    return "\n".join(lines)


def _latex(table: pd.DataFrame, caption: str) -> str:
    body = table.map(lambda v: v.replace("+-", r"$\pm$"))
    body.columns = [c.replace("_", r"\_") for c in body.columns]
    body.index = [str(i).replace("_", r"\_") for i in body.index]
    return body.to_latex(caption=caption.replace("_", r"\_"), column_format="l" + "c" * len(body.columns))


def render(tables: dict[tuple[str, str, str], pd.DataFrame], fmt: str) -> str:
    """All tables in one of ``text``, ``markdown`` or ``latex``."""
    parts = []
    for (rule, dataset, metric), table in tables.items():
        title = _title(rule, dataset, metric)
        if fmt == "text":
            parts.append(f"-- {title}\n{table.to_string()}")
        elif fmt == "markdown":
            parts.append(f"### {title}\n\n{to_markdown(table)}")
        elif fmt == "latex":
            parts.append(_latex(table, title))
        else:
            raise DataError(f"unknown table format {fmt!r}; choose text, markdown, csv or latex")
    return "\n\n".join(parts) + "\n"
