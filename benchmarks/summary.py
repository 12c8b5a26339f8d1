"""Issue 20's before/after table from ``bench.py`` result files (one per image size or model).

    python benchmarks/summary.py benchmarks/results/cpu_issue20_224.json benchmarks/results/cpu_issue20_64.json

"Before" is the reference path (``qtdog_ref``/``fqat_ref``: parametrized weights, eager kernels),
"after" the default path (``qtdog``/``fqat``), both timed interleaved with FP ERM in the same run.
Step ratios are the harness's median of per-round ratios, with the best-round ratio in brackets
(each method's fastest round over ERM's: on a shared CPU other jobs only add time); the target
mark reads the median. SAGM (FP, two passes) is what FQAT costs without quantization.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TARGETS = {"qtdog": 1.05, "saved": 1.10, "fqat": 2.1}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _cell(before: float | None, after: float | None, target: float, best: float | None = None) -> str:
    if before is None and after is None:
        return "-"
    mark = "" if after is None else (" ok" if after <= target else " **over**")
    bracket = "" if best is None else f" [{best:.2f}]"
    return f"{_fmt(before)} -> {_fmt(after)}{bracket}{mark}"


def _ratios(runs: dict[str, dict]):  # noqa: ANN202 - a local lookup
    """``ratio(method, key)``: a method's step ratio, or its saved MB over FP's (None if not run)."""
    fp = runs["erm"]

    def ratio(method: str, key: str = "ratio_vs_fp") -> float | None:
        run = runs.get(method)
        if run is None or run.get(key) is None:
            return None
        return run[key] / fp["saved_mb"] if key == "saved_mb" else run[key]

    return ratio


def rows(result: dict[str, Any]) -> list[str]:
    """One Markdown row per model of one result file."""
    meta = result["meta"]
    by_model: dict[str, dict[str, dict]] = {}
    for r in result["training"]:
        by_model.setdefault(r["model"], {})[r["method"]] = r
    out = []
    for model, runs in by_model.items():
        fp = runs["erm"]
        ratio = _ratios(runs)
        out.append(
            f"| {model} | {meta['image_size']} | {fp['batch']} | "
            f"{_cell(ratio('qtdog_ref'), ratio('qtdog'), TARGETS['qtdog'], ratio('qtdog', 'ratio_best'))} | "
            f"{_cell(ratio('qtdog_ref', 'saved_mb'), ratio('qtdog', 'saved_mb'), TARGETS['saved'])} | "
            f"{_cell(ratio('fqat_ref'), ratio('fqat'), TARGETS['fqat'], ratio('fqat', 'ratio_best'))} | "
            f"{_fmt(ratio('sagm'))} [{_fmt(ratio('sagm', 'ratio_best'))}] | "
            f"{fp['saved_mb']:.0f} | {meta['quant_kernel']} | {meta['date']}, load {meta['load_start']} / "
            f"{meta['load_end']}, {meta['repeats']}x{meta['steps']} steps |"
        )
    return out


def table(paths: Sequence[Path]) -> str:
    lines = [
        "| model | px | batch | QT-DoG step x FP (before -> after; target 1.05) | saved for backward x FP "
        "(target 1.10) | FQAT W4A4 step x FP (target 2.1) | SAGM x FP | FP saved MB | kernels | run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        lines += rows(json.loads(path.read_text()))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="summary", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="bench.py JSON files")
    args = p.parse_args(argv)
    missing = [str(path) for path in args.results if not path.is_file()]
    if missing:
        print(
            f"summary: error: no such result file: {', '.join(missing)}; run benchmarks/bench.py first", file=sys.stderr
        )
        return 2
    print(table(args.results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
