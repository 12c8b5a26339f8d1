"""Figures of the analyses as PNG files, each with its numbers beside it as CSV (same stem).

matplotlib's Agg backend is used through ``Figure`` objects, so no display and no global pyplot
state are involved; files are written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from dg_quant.errors import require_optional
from dg_quant.io import atomic_write_bytes, atomic_write_text

Figure = require_optional("matplotlib.figure").Figure  # one line naming the extra when it is missing


def save_frame(frame: pd.DataFrame, path: str | Path) -> Path:
    """``frame`` as CSV at ``path``."""
    path = Path(path)
    atomic_write_text(path, frame.to_csv(index=False))
    return path


def save_figure(fig: Figure, frame: pd.DataFrame, stem: str | Path) -> tuple[Path, Path]:
    """``stem.png`` and ``stem.csv`` (the plotted numbers)."""
    stem = Path(stem)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    png = stem.with_suffix(".png")
    atomic_write_bytes(png, buffer.getvalue())
    return png, save_frame(frame, stem.with_suffix(".csv"))


def plot_flatness(summary: pd.DataFrame, stem: str | Path) -> tuple[Path, Path]:
    """F_gamma against the radius, one line (with a standard-error band) per run and split."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    keys = [k for k in ("label", "split") if k in summary]
    for key, group in summary.groupby(keys, sort=False):
        group = group.sort_values("radius")
        name = " / ".join(map(str, key if isinstance(key, tuple) else (key,)))
        ax.plot(group["radius"], group["f_gamma"], marker="o", label=name)
        ax.fill_between(
            group["radius"], group["f_gamma"] - group["f_stderr"], group["f_gamma"] + group["f_stderr"], alpha=0.2
        )
    ax.set_xlabel("radius gamma")
    ax.set_ylabel("local flatness F_gamma (loss increase)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return save_figure(fig, summary, stem)


def plot_surface_1d(frame: pd.DataFrame, stem: str | Path) -> tuple[Path, Path]:
    """Loss (and accuracy, right axis) along one filter-normalised direction, per label."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    acc_ax = ax.twinx()
    groups = frame.groupby("label", sort=False) if "label" in frame else [("", frame)]
    for label, group in groups:
        line = ax.plot(group["alpha"], group["loss"], label=f"{label} loss".strip())[0]
        acc_ax.plot(group["alpha"], group["acc"], linestyle="--", color=line.get_color(), label=f"{label} acc".strip())
    ax.set_xlabel("alpha (filter-normalised direction)")
    ax.set_ylabel("loss")
    acc_ax.set_ylabel("accuracy (dashed)")
    ax.legend(fontsize="small", loc="upper left")
    return save_figure(fig, frame, stem)


def plot_surface_2d(frame: pd.DataFrame, stem: str | Path) -> tuple[Path, Path]:
    """Loss contours over the plane of two filter-normalised directions."""
    alphas, betas = np.sort(frame["alpha"].unique()), np.sort(frame["beta"].unique())
    grid = frame.pivot_table(index="beta", columns="alpha", values="loss").reindex(index=betas, columns=alphas)
    fig = Figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    contour = ax.contourf(alphas, betas, grid.to_numpy(), levels=20, cmap="viridis")
    fig.colorbar(contour, ax=ax, label="loss")
    ax.plot([0], [0], marker="*", color="white", markersize=10)
    ax.set_xlabel("alpha")
    ax.set_ylabel("beta")
    return save_figure(fig, frame, stem)


def plot_noise(stats: pd.DataFrame, hists: pd.DataFrame, stem: str | Path, layer: str | None = None):
    """QT-DoG Fig. 2 for one layer: weights, quantization noise with its uniform reference, and
    the symmetry of the weights (|w| of positive against negative weights)."""
    layer = layer or str(stats.sort_values("numel").iloc[-1]["layer"])
    row = stats[stats["layer"] == layer].iloc[0]
    h = hists[hists["layer"] == layer]
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    for ax, kind, title in ((axes[0], "weight", "weights"), (axes[1], "noise", "quantization noise")):
        part = h[h["kind"] == kind]
        ax.bar(part["bin_left"], part["density"], width=part["bin_right"] - part["bin_left"], align="edge")
        ax.set_title(f"{title} ({layer})", fontsize="small")
    lo, hi = row["noise_min"], row["noise_max"]
    if hi > lo:
        unit = row.get("kl_uniform_unit")
        note = f"; per-step KL {unit:.4f}" if unit is not None and unit == unit else ""
        axes[1].hlines(1.0 / (hi - lo), lo, hi, colors="red", label=f"uniform, KL {row['kl_uniform']:.4f}{note}")
        axes[1].legend(fontsize="small")
    for kind, name in (("abs_pos", "w > 0"), ("abs_neg", "w < 0 (mirrored)")):
        part = h[h["kind"] == kind]
        axes[2].step(part["bin_left"], part["density"], where="post", label=name)
    axes[2].set_title(f"symmetry (skew {row['weight_skew']:.3f})", fontsize="small")
    axes[2].legend(fontsize="small")
    return save_figure(fig, h, stem)


def plot_noise_kl(stats: pd.DataFrame, stem: str | Path) -> tuple[Path, Path]:
    """KL divergence of each layer's quantization noise to uniform (App. J's per-layer view)."""
    fig = Figure(figsize=(max(5, 0.35 * len(stats)), 4))
    ax = fig.add_subplot()
    ax.bar(range(len(stats)), stats["kl_uniform"])
    ax.set_xticks(range(len(stats)), stats["layer"], rotation=90, fontsize="x-small")
    ax.set_ylabel("KL(noise || uniform)")
    return save_figure(fig, stats, stem)


def plot_stability(frame: pd.DataFrame, stem: str | Path) -> tuple[Path, Path]:
    """QT-DoG Fig. 4: in-domain validation (dashed) and OOD (solid) accuracy over steps, per run."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for label, group in frame.groupby("label", sort=False):
        group = group.sort_values("step")
        line = ax.plot(group["step"], group["ood"], label=f"{label} OOD")[0]
        ax.plot(group["step"], group["id_val"], linestyle="--", color=line.get_color(), label=f"{label} in-domain val")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return save_figure(fig, frame, stem)
