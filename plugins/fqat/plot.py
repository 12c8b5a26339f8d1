"""Read and plot ``fqat_disorder.jsonl``: per-layer disorder and frozen state over training.

from dg_quant.plugins.fqat.plot import plot_disorder
plot_disorder("runs/my_fqat_run")          # writes runs/my_fqat_run/fqat_disorder.png
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from dg_quant.errors import DataError, require_optional
from dg_quant.io import atomic_write_bytes
from dg_quant.plugins.fqat.run import LOG_FILE


def disorder_frame(log_dir: str | Path) -> pd.DataFrame:
    """One row per (window end ``step``, ``scale``) with ``disorder``, ``frozen``, ``frozen_fraction``."""
    path = Path(log_dir) / LOG_FILE
    if not path.exists():
        raise DataError(f"{path} does not exist; it is written by a run with --plugin dg_quant.fqat")
    return pd.read_json(path, lines=True)


def plot_disorder(log_dir: str | Path, out: str | Path | None = None, tau: float | None = None) -> Path:
    """Two panels: disorder per scale factor over steps, and which scale factors were frozen."""
    matplotlib = require_optional("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = disorder_frame(log_dir)
    disorder = frame.pivot(index="step", columns="scale", values="disorder")
    frozen = frame.pivot(index="step", columns="scale", values="frozen_fraction")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    disorder.plot(ax=top, legend=len(disorder.columns) <= 12, marker=".")
    if tau is not None:
        top.axhline(tau, color="black", linestyle="--", label=f"τ = {tau}")
    top.set_ylabel("gradient disorder")
    top.set_ylim(-0.02, 1.02)
    if len(disorder.columns) <= 12:
        top.legend(fontsize=6, ncol=2)
    # A decision taken at the end of a window holds for the next window: draw it over that span.
    steps = frozen.index.to_numpy()
    width = float(steps[1] - steps[0]) if len(steps) > 1 else 1.0
    edges = list(steps) + [steps[-1] + width]
    bottom.pcolormesh(
        edges,
        range(len(frozen.columns) + 1),
        frozen.T.to_numpy(dtype=float),
        cmap="Blues",
        vmin=0,
        vmax=1,
        shading="flat",
    )
    bottom.set_yticks([i + 0.5 for i in range(len(frozen.columns))], frozen.columns, fontsize=6)
    bottom.invert_yaxis()
    bottom.set_xlabel("step (end of window)")
    bottom.set_ylabel("frozen (fraction)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    path = Path(out) if out is not None else Path(log_dir) / "fqat_disorder.png"
    atomic_write_bytes(path, buffer.getvalue())
    return path
