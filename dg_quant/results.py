"""Printing run results: one run, or several side by side (``dgq_results``).

A run's result is a host-neutral record (a dict): ``dataset``, ``model``, ``seed``, ``plugins``,
``val_metric``, ``test_metric``, the ``best`` and ``last`` evaluation records, ``compression``
and, for the comparison table, the run's settings under ``config``. Hosts read their own run
folders into it (the WILDS host: ``dg_quant.adapters.wilds.run_results``), and into the
``RunResult``/``EnsembleResult`` records that ``dg_quant.analysis`` tabulates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

SPLIT_ORDER = ("train", "id_val", "val", "test", "id_test")
TEST_METRIC = "test/acc_avg"


@dataclass
class RunResult:
    """One run as its host reports it.

    ``info``: ``run`` (its name or folder), ``dataset``, ``method``, ``model``, ``bits``, ``seed``,
    ``val_metric``, ``test_metric`` and ``test_env`` (None: named by the records' test groups).
    ``records``: its evaluation records in step order, each a ``step`` and ``split/metric`` values.
    """

    info: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EnsembleResult:
    """An ensemble's evaluation (``metrics``) with its first member's ``info``, its members' seeds and
    the selection rule its members were picked by (``training_domain`` or ``last``)."""

    run: str
    info: dict[str, Any]
    seeds: str
    rule: str
    metrics: dict[str, Any]


def _splits(record: dict[str, Any]) -> list[str]:
    names = {k.split("/", 1)[0] for k in record if "/" in k and not k.startswith("train/")}
    return sorted(names, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s))


def method_name(final: dict[str, Any]) -> str:
    plugins = final.get("plugins") or []
    return "+".join(p.rsplit(".", 1)[-1] for p in plugins) or "erm"


def format_run(final: dict[str, Any]) -> str:
    """Per-split average and per-group accuracy at the last step and at the best validation step."""
    lines = [f"{final['dataset']} | method {method_name(final)} | model {final['model']} | seed {final['seed']}"]
    for label, record in (("last step", final["last"]), (f"best {final['val_metric']}", final["best"])):
        if not record:
            continue
        lines.append(f"-- {label} (step {record['step']})")
        for split in _splits(record):
            groups = {
                k.split("/", 1)[1].split(":", 1)[1]: v
                for k, v in record.items()
                if k.startswith(f"{split}/acc_")
                and ":" in k
                and v is not None
                and record.get(k.replace("/acc_", "/count_", 1), 1)
            }
            avg = record.get(f"{split}/acc_avg")
            head = f"   {split:<7} acc_avg {avg:.4f}" if avg is not None else f"   {split:<7}"
            extra = [
                f"{k.split('/', 1)[1]} {v:.4f}"
                for k, v in record.items()
                if k.startswith(f"{split}/")
                and ":" not in k
                and k != f"{split}/acc_avg"
                and isinstance(v, float)
                and not k.split("/", 1)[1].startswith("count")
            ]
            body = "  ".join([head] + extra)
            if groups:
                body += "\n" + "           " + "  ".join(f"{g} {v:.3f}" for g, v in groups.items())
            lines.append(body)
    c = final.get("compression", {})
    if c:
        lines.append(
            f"-- size: FP32 {c['fp32_mb']:.3f} MiB -> packed {c['packed_mb']:.3f} MiB "
            f"(compression x{c['compression_ratio']:.2f}, {c['quantized_layers']} quantized tensors)"
        )
    return "\n".join(lines)


def comparison_rows(finals: Sequence[dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per run: what it trained on and with, the selection metric at the best step, and
    the run's own ``test_metric`` (the dataset's official metric) at the best and the last step.

    Column headers name the metric when every run shares it (``id_val/acc_avg@best``); otherwise
    a ``val_metric``/``test_metric`` column names it per run.
    """
    val_metrics = {f.get("val_metric") for f in finals}
    test_metrics = {_test_metric(f) for f in finals}
    val_head = f"{next(iter(val_metrics))}@best" if len(val_metrics) == 1 else "val@best"
    test_head = next(iter(test_metrics)) if len(test_metrics) == 1 else "test"
    rows = []
    for name, final in zip(names, finals):
        best, last = final.get("best") or {}, final.get("last") or {}
        config = final.get("config") or {}
        row: dict[str, Any] = {
            "run": name,
            "dataset": final.get("dataset"),
            "test_domain": _test_domains(final, config),
            "method": method_name(final),
            "model": final.get("model"),
            "bits": bits_label(final, config),
        }
        if len(val_metrics) > 1:
            row["val_metric"] = final.get("val_metric")
        row[val_head] = best.get(final.get("val_metric"))
        if len(test_metrics) > 1:
            row["test_metric"] = _test_metric(final)
        row[f"{test_head}@best"] = best.get(_test_metric(final))
        row[f"{test_head}@last"] = last.get(_test_metric(final))
        row["compression"] = final.get("compression", {}).get("compression_ratio")
        rows.append(row)
    return rows


def _test_metric(final: dict[str, Any]) -> str:
    return final.get("test_metric") or "test/acc_avg"


def _test_domains(final: dict[str, Any], config: dict[str, Any]) -> str | None:
    """The held-out domain(s): ``--test_domain``, else the groups the test split reports."""
    if config.get("test_domain"):
        return str(config["test_domain"])
    record = final.get("last") or {}
    groups = sorted({k.split(":", 1)[1] for k in record if k.startswith("test/acc_") and ":" in k})
    return ",".join(groups) if 0 < len(groups) <= 3 else None


def bits_label(final: dict[str, Any], config: dict[str, Any]) -> str:
    """``w7``/``w4a4`` from the run's ``bits``/``act_bits`` settings; ``fp32`` for a run without
    them or whose compression report counts no quantized tensor."""
    bits, act = config.get("bits"), config.get("act_bits")
    quantized = (final.get("compression") or {}).get("quantized_layers")
    if bits is None or quantized == 0:
        return "fp32"
    return f"w{bits}" + (f"a{act}" if act else "")


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of ``rows`` (floats with four decimals)."""
    if not rows:
        return "(no runs)"
    cols = list(rows[0])
    cells = [[_cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
