"""``dgq_results runs/erm runs/qtdog``: a comparison table of finished ``wilds_run`` folders."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from dg_quant.adapters.wilds.run_results import find_finished_runs, load_final, with_config
from dg_quant.errors import run_command
from dg_quant.options import CommandParser
from dg_quant.results import comparison_rows, format_table


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
        finals = [with_config(load_final(r), r) for r in runs]
        print(format_table(comparison_rows(finals, [str(r) for r in runs])))

    return run_command("dgq_results", show)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
