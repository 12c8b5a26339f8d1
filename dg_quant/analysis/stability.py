"""Training stability (QT-DoG Fig. 4): in-domain validation and OOD accuracy over the steps of
several runs (their evaluation records), plus numbers that summarise each curve."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dg_quant.errors import DataError
from dg_quant.results import RunResult


def stability_frame(
    runs: Sequence[RunResult],
    labels: Sequence[str] | None = None,
    id_metric: str | None = None,
    ood_metric: str = "test/acc_avg",
) -> pd.DataFrame:
    """Long frame: label, run, step, ``id_val`` (each run's val_metric unless given), ``ood``."""
    if labels is not None and len(labels) != len(runs):
        raise DataError(f"{len(labels)} labels for {len(runs)} runs; give one label per run")
    rows = []
    for i, run in enumerate(runs):
        run_dir, records = run.info["run"], run.records
        label = labels[i] if labels else Path(run_dir).name
        metric = id_metric or run.info["val_metric"]
        usable = [r for r in records if r.get(metric) is not None and r.get(ood_metric) is not None]
        if not usable:
            raise DataError(f"{run_dir} has no records with both {metric!r} and {ood_metric!r}")
        rows += [
            {"label": label, "run": str(run_dir), "step": r["step"], "id_val": r[metric], "ood": r[ood_metric]}
            for r in usable
        ]
    return pd.DataFrame(rows)


def stability_summary(frame: pd.DataFrame, after_step: int = 0) -> pd.DataFrame:
    """Per run, over steps >= ``after_step``: OOD std and range, the OOD accuracy at the best
    in-domain validation against the best OOD accuracy (the selection gap), and the Pearson
    correlation of the two curves (how well in-domain validation tracks OOD)."""
    rows = []
    for label, group in frame[frame["step"] >= after_step].groupby("label", sort=False):
        group = group.sort_values("step")
        ood, idv = group["ood"].to_numpy(float), group["id_val"].to_numpy(float)
        at_best = float(ood[int(np.argmax(idv))])
        corr = float(np.corrcoef(idv, ood)[0, 1]) if len(group) > 1 and idv.std() > 0 and ood.std() > 0 else None
        rows.append(
            {
                "label": label,
                "evals": len(group),
                "ood_std": float(ood.std()),
                "ood_range": float(ood.max() - ood.min()),
                "ood_at_best_id_val": at_best,
                "ood_max": float(ood.max()),
                "selection_gap": float(ood.max()) - at_best,
                "id_ood_corr": corr,
            }
        )
    return pd.DataFrame(rows)
