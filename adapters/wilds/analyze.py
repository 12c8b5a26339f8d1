"""``dgq_analyze``: the QT-DoG paper's tables and figures from your own ``wilds_run`` folders.

    dgq_analyze table runs/                         # DomainBed-style tables (text; --format ...)
    dgq_analyze flatness runs/erm runs/qtdog --out figs   # SWAD F_gamma on source and target
    dgq_analyze flatness runs/sweeps/flatness_pacs_cpu    # Fig. 3: ERM, SAM, SWA, SWAD, QT-DoG, ...
    dgq_analyze surface runs/qtdog --dims 2 --out figs    # filter-normalised loss surface
    dgq_analyze noise runs/qtdog --out figs               # weights vs quantization noise (Fig. 2)
    dgq_analyze stability runs/erm runs/qtdog --out figs  # in-domain vs OOD over steps (Fig. 4)

Every figure is a PNG with its numbers beside it as CSV, written (unless ``--out``) into
``analysis/`` inside the run folder, or inside the folder that holds all the runs given; every
file written is listed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dg_quant.errors import ConfigError, run_command
from dg_quant.options import CommandParser, HelpFormatter, plain_text

PROG = "dgq_analyze"
FORMATS = ("text", "markdown", "csv", "latex")
SUFFIX = {"text": ".txt", "markdown": ".md", "csv": ".csv", "latex": ".tex"}


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--which",
        choices=("best", "last"),
        default="best",
        help="checkpoint: best in-domain validation (best_model.pt) or last step (model.pt)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch_size", type=int, default=256, help="evaluation batch size")
    parser.add_argument(
        "--max_batches",
        type=int,
        default=None,
        help="evaluate on at most this many batches per split, drawn at random (--seed) from the whole split "
        "(faster, noisier)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random directions and --max_batches' sample")
    _add_out(parser)


def _add_out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default=None,
        help="output folder for the PNG and CSV files (default: analysis/ in the run folder, "
        "or in the folder that holds all the runs)",
    )


def output_folder(out: str | None, runs: Sequence[str]) -> Path:
    """``--out``, else ``analysis/`` beside the data: in the run folder, or in the runs' common folder."""
    if out is not None:
        return Path(out)
    folders = [os.path.abspath(r) for r in runs]
    base = folders[0] if len(folders) == 1 else os.path.commonpath(folders)
    return Path(os.path.relpath(base)) / "analysis"


def _report(paths: Sequence[Path]) -> None:
    print("wrote " + ", ".join(str(p) for p in paths))


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog=PROG, description=plain_text(__doc__), formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    table = sub.add_parser("table", help="DomainBed-style result tables over seeds", formatter_class=HelpFormatter)
    table.add_argument("runs", nargs="+", help="run folders, or folders that hold them")
    table.add_argument(
        "--format",
        choices=FORMATS + ("all",),
        default="text",
        help="output format; all prints every one (and writes every one with --out)",
    )
    table.add_argument(
        "--selection",
        nargs="+",
        default=["training_domain", "last", "oracle"],
        choices=("training_domain", "last", "oracle"),
        help="model-selection rules",
    )
    table.add_argument(
        "--metric",
        default=None,
        help="record key reported in the cells (default: each run's own test_metric, the "
        "dataset's official metric, e.g. test/10th_percentile_acc for Amazon)",
    )
    table.add_argument(
        "--by", nargs="+", default=[], metavar="SETTING", help="config settings that tell methods apart (e.g. bits lr)"
    )
    table.add_argument("--out", default=None, help="also write results.{txt,md,csv,tex} into this folder")

    flat = sub.add_parser("flatness", help="SWAD local flatness F_gamma over radii", formatter_class=HelpFormatter)
    flat.add_argument("runs", nargs="+", help="run folders, or folders that hold them (e.g. a sweep's output)")
    flat.add_argument(
        "--radii",
        type=float,
        nargs="+",
        default=[0, 1, 2, 4, 6, 8, 10],
        help="L2 radii gamma of the whole-parameter perturbation (SWAD used up to 60 for ResNet-50)",
    )
    flat.add_argument("--directions", type=int, default=100, help="Monte-Carlo directions")
    flat.add_argument(
        "--splits", nargs="+", default=["id_val", "test"], help="source (id_val, train) and target (test, val) splits"
    )
    flat.add_argument("--include_steps", action="store_true", help="perturb LSQ step sizes too")
    _add_model_options(flat)

    surf = sub.add_parser("surface", help="filter-normalised 1-D or 2-D loss surface", formatter_class=HelpFormatter)
    surf.add_argument("runs", nargs="+", help="run folders (2-D: one figure per run)")
    surf.add_argument(
        "--dims",
        type=int,
        choices=(1, 2),
        default=1,
        help="1: one random direction, all runs in one figure; 2: two directions, a figure per run",
    )
    surf.add_argument("--points", type=int, default=21, help="grid points per axis")
    surf.add_argument("--span", type=float, default=1.0, help="coefficients in [-span, span]")
    surf.add_argument("--split", default="test", help="split the loss is computed on")
    surf.add_argument(
        "--steps_only", action="store_true", help="perturb only the LSQ step sizes (the FQAT author's disturb_s)"
    )
    _add_model_options(surf)

    noise = sub.add_parser(
        "noise", help="per-layer weights, quantization noise and KL to uniform", formatter_class=HelpFormatter
    )
    noise.add_argument("run", help="run folder")
    noise.add_argument(
        "--bits", type=int, default=None, help="simulate this bit width (default: the run's own quantizers, else 7)"
    )
    noise.add_argument("--bins", type=int, default=100, help="histogram bins")
    noise.add_argument("--layer", default=None, help="layer for the Fig. 2 panels (default: the largest)")
    noise.add_argument(
        "--which",
        choices=("best", "last"),
        default="best",
        help="checkpoint: best in-domain validation (best_model.pt) or last step (model.pt)",
    )
    _add_out(noise)

    stab = sub.add_parser("stability", help="in-domain validation vs OOD over steps", formatter_class=HelpFormatter)
    stab.add_argument("runs", nargs="+", help="run folders")
    stab.add_argument("--labels", nargs="+", default=None, help="one legend label per run")
    stab.add_argument("--ood_metric", default="test/acc_avg", help="out-of-domain metric plotted")
    stab.add_argument("--id_metric", default=None, help="in-domain metric plotted (default: each run's val_metric)")
    stab.add_argument("--after_step", type=int, default=0, help="summarise only steps >= this")
    _add_out(stab)
    return parser


def cmd_table(args: argparse.Namespace) -> None:
    from dg_quant.adapters.wilds.run_results import read_runs
    from dg_quant.analysis import tables
    from dg_quant.io import atomic_write_text

    runs, ensembles = read_runs(args.runs, args.by)
    frame = tables.collect(runs, ensembles, metric=args.metric, selections=args.selection)
    summary = tables.summarize(frame)
    wide = tables.wide_tables(summary)
    outputs = {
        fmt: summary.to_csv(index=False) if fmt == "csv" else tables.render(wide, fmt)
        for fmt in (FORMATS if args.format == "all" else (args.format,))
    }
    for text in outputs.values():
        print(text, end="" if text.endswith("\n") else "\n")
    if args.out:
        for fmt, text in outputs.items():
            atomic_write_text(Path(args.out) / f"results{SUFFIX[fmt]}", text)
        atomic_write_text(Path(args.out) / "runs.csv", frame.to_csv(index=False))


def _evaluators(loaded, splits: Sequence[str], args: argparse.Namespace) -> dict:
    from dg_quant.adapters.wilds.checkpoints import eval_loader
    from dg_quant.adapters.wilds.datasets import SubsetSpec
    from dg_quant.analysis.perturb import batch_evaluator, cached_batches

    dataset = loaded.load_dataset()
    unknown = [s for s in splits if s not in dataset.split_dict]
    if unknown:
        raise ConfigError(f"unknown split(s) {', '.join(unknown)}; this dataset has {', '.join(dataset.split_dict)}")
    sample = args.max_batches * args.batch_size if args.max_batches else None
    return {
        s: batch_evaluator(
            cached_batches(
                eval_loader(dataset, s, loaded.model, args.batch_size, SubsetSpec.of(loaded.config), sample, args.seed),
                args.device,
            )
        )
        for s in splits
    }


def run_folders(paths: Sequence[str]) -> list[str]:
    """Run folders among ``paths`` (a run folder, or a folder holding runs such as a sweep's output)."""
    from dg_quant.adapters.wilds.run_results import find_runs

    return [str(p) for p in find_runs(paths)]


def run_labels(runs: Sequence[str]) -> list[str]:
    """A label per run: its path below the runs' common folder (``swad_qtdog/sketch/seed0`` in a
    sweep), or its folder name for a single run."""
    if len(runs) == 1:
        return [Path(runs[0]).name]
    base = os.path.commonpath([os.path.abspath(r) for r in runs])
    return [os.path.relpath(os.path.abspath(r), base) for r in runs]


def cmd_flatness(args: argparse.Namespace) -> None:
    import pandas as pd

    from dg_quant.adapters.wilds.checkpoints import load_run_model
    from dg_quant.analysis.flatness import flatness_summary, local_flatness
    from dg_quant.analysis.plots import plot_flatness, save_frame

    summaries, samples = [], []
    runs = run_folders(args.runs)
    for run, label in zip(runs, run_labels(runs)):
        loaded = load_run_model(run, args.which, args.device)
        raw = local_flatness(
            loaded.model,
            _evaluators(loaded, args.splits, args),
            args.radii,
            n_directions=args.directions,
            include_steps=args.include_steps,
            seed=args.seed,
        )
        samples.append(raw.assign(label=label))
        summaries.append(flatness_summary(raw).assign(label=label))
    summary = pd.concat(summaries, ignore_index=True)
    out = output_folder(args.out, args.runs)
    samples_csv = save_frame(pd.concat(samples, ignore_index=True), out / "flatness_samples.csv")
    png, csv = plot_flatness(summary, out / "flatness")
    print(summary.to_string(index=False))
    _report([png, csv, samples_csv])


def cmd_surface(args: argparse.Namespace) -> None:
    import pandas as pd

    from dg_quant.adapters.wilds.checkpoints import load_run_model
    from dg_quant.analysis.plots import plot_surface_1d, plot_surface_2d
    from dg_quant.analysis.surface import grid, loss_surface_1d, loss_surface_2d

    coefs = grid(args.span, args.points)
    out = output_folder(args.out, args.runs)
    frames = []
    for run in args.runs:
        loaded = load_run_model(run, args.which, args.device)
        evaluate = _evaluators(loaded, [args.split], args)[args.split]
        label = Path(run).name
        if args.dims == 1:
            frames.append(
                loss_surface_1d(loaded.model, evaluate, coefs, args.seed, args.steps_only).assign(label=label)
            )
            continue
        frame = loss_surface_2d(loaded.model, evaluate, coefs, coefs, args.seed, args.steps_only).assign(label=label)
        png, csv = plot_surface_2d(frame, out / f"surface2d_{label}")
        print(
            f"{label}: loss at the centre {float(frame.loc[(frame.alpha == 0) & (frame.beta == 0), 'loss'].mean()):.4f}, "
            f"max {frame['loss'].max():.4f}"
        )
        _report([png, csv])
    if frames:
        frame = pd.concat(frames, ignore_index=True)
        png, csv = plot_surface_1d(frame, out / "surface1d")
        print(frame.to_string(index=False))
        _report([png, csv])


def cmd_noise(args: argparse.Namespace) -> None:
    from dg_quant.adapters.wilds.checkpoints import load_run_model
    from dg_quant.analysis.noise import noise_tables
    from dg_quant.analysis.plots import plot_noise, plot_noise_kl, save_frame

    loaded = load_run_model(args.run, args.which, "cpu")
    stats, hists = noise_tables(loaded.model, bits=args.bits, bins=args.bins)
    if stats.empty:
        raise ConfigError("the model has no quantizable weights")
    if args.layer is not None and args.layer not in set(stats["layer"]):
        raise ConfigError(f"unknown layer {args.layer!r}; choose from {', '.join(stats['layer'])}")
    out = output_folder(args.out, [args.run])
    layers_csv = save_frame(stats, out / "noise_layers.csv")
    png, csv = plot_noise(stats, hists, out / "noise", args.layer)
    kl_png, kl_csv = plot_noise_kl(stats, out / "noise_kl")
    columns = ["layer", "numel", "bits", "step_mean", "clipped_fraction", "kl_uniform", "kl_uniform_unit"]
    print(stats[columns].to_string(index=False))
    _report([png, csv, kl_png, kl_csv, layers_csv])


def cmd_stability(args: argparse.Namespace) -> None:
    from dg_quant.adapters.wilds.run_results import read_run
    from dg_quant.analysis.plots import plot_stability, save_frame
    from dg_quant.analysis.stability import stability_frame, stability_summary

    runs = [read_run(d) for d in args.runs]
    frame = stability_frame(runs, args.labels, args.id_metric, args.ood_metric)
    summary = stability_summary(frame, args.after_step)
    out = output_folder(args.out, args.runs)
    png, csv = plot_stability(frame, out / "stability")
    summary_csv = save_frame(summary, out / "stability_summary.csv")
    print(summary.to_string(index=False))
    _report([png, csv, summary_csv])


COMMANDS = {
    "table": cmd_table,
    "flatness": cmd_flatness,
    "surface": cmd_surface,
    "noise": cmd_noise,
    "stability": cmd_stability,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: COMMANDS[args.command](args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
