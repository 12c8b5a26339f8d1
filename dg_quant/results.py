"""Reading run folders and printing their results: one run, or several side by side.

``dgq_results runs/erm runs/qtdog`` prints a comparison table of the runs' ``final.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dg_quant.errors import DataError, run_command

SPLIT_ORDER = ("train", "id_val", "val", "test", "id_test")


def load_final(run_dir: str | Path) -> dict[str, Any]:
    """The ``final.json`` of a finished run, or a one-line error naming the folder."""
    path = Path(run_dir) / "final.json"
    if not path.is_file():
        raise DataError(f"{run_dir} has no final.json; is it a finished wilds_run folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg}); the run may have been written by another tool") from None


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
            groups = {k.split("/", 1)[1].split(":", 1)[1]: v for k, v in record.items()
                      if k.startswith(f"{split}/acc_") and ":" in k and v is not None
                      and record.get(k.replace("/acc_", "/count_", 1), 1)}
            avg = record.get(f"{split}/acc_avg")
            head = f"   {split:<7} acc_avg {avg:.4f}" if avg is not None else f"   {split:<7}"
            extra = [f"{k.split('/', 1)[1]} {v:.4f}" for k, v in record.items()
                     if k.startswith(f"{split}/") and ":" not in k and k != f"{split}/acc_avg"
                     and isinstance(v, float) and not k.split("/", 1)[1].startswith("count")]
            body = "  ".join([head] + extra)
            if groups:
                body += "\n" + "           " + "  ".join(f"{g} {v:.3f}" for g, v in groups.items())
            lines.append(body)
    c = final.get("compression", {})
    if c:
        lines.append(f"-- size: FP32 {c['fp32_mb']:.3f} MiB -> packed {c['packed_mb']:.3f} MiB "
                     f"(compression x{c['compression_ratio']:.2f}, {c['quantized_layers']} quantized tensors)")
    return "\n".join(lines)


def comparison_rows(finals: Sequence[dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per run: method, selection metric, OOD accuracy (best and last) and compression."""
    rows = []
    for name, final in zip(names, finals):
        best, last = final.get("best") or {}, final.get("last") or {}
        test_key = "test/acc_avg"
        rows.append({
            "run": name,
            "method": method_name(final),
            "val (best)": best.get(final["val_metric"]),
            "test@best": best.get(test_key),
            "test@last": last.get(test_key),
            "compression": final.get("compression", {}).get("compression_ratio"),
        })
    return rows


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dgq_results", description="Compare finished runs side by side.")
    parser.add_argument("runs", nargs="+", help="run folders (each with a final.json)")
    args = parser.parse_args(argv)

    def show() -> None:
        finals = [load_final(r) for r in args.runs]
        print(format_table(comparison_rows(finals, args.runs)))

    return run_command("dgq_results", show)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
