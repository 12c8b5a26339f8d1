"""Reading run folders and printing their results: one run, or several side by side.

``dgq_results runs/erm runs/qtdog`` prints a comparison table of the runs' ``final.json``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dg_quant.errors import DataError, run_command
from dg_quant.options import CommandParser

SPLIT_ORDER = ("train", "id_val", "val", "test", "id_test")


def load_final(run_dir: str | Path) -> dict[str, Any]:
    """The ``final.json`` of a finished run, or a one-line error naming the folder."""
    path = Path(run_dir) / "final.json"
    if not path.is_file():
        raise DataError(f"{run_dir} has no final.json; is it a finished wilds_run folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} is not valid JSON ({exc.msg}); the run may have been written by another tool"
        ) from None


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


def find_finished_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Finished run folders among ``paths``: each path is a run folder (with ``final.json``) or a
    folder searched recursively for them, as ``dgq_analyze table`` does."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / "final.json").is_file() or not path.is_dir():
            found.append(path)  # load_final names a missing or broken final.json
            continue
        inner = sorted(p.parent for p in path.rglob("final.json"))
        if not inner:
            raise DataError(f"{path} has no final.json, nor any folder under it; is it a finished wilds_run folder?")
        found.extend(inner)
    return list(dict.fromkeys(found))


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


def _with_config(final: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """``final`` with the run's ``config.json`` under ``config`` (test domain, bit widths)."""
    path = run_dir / "config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        config = {}
    return {**final, "config": config}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(
        prog="dgq_results",
        description="Compare finished runs side by side: each run's official test metric at the "
        "best-validation and the last step.",
    )
    parser.add_argument("runs", nargs="+", help="run folders (each with a final.json), or folders that hold them")
    args = parser.parse_args(argv)

    def show() -> None:
        runs = find_finished_runs(args.runs)
        finals = [_with_config(load_final(r), r) for r in runs]
        print(format_table(comparison_rows(finals, [str(r) for r in runs])))

    return run_command("dgq_results", show)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
