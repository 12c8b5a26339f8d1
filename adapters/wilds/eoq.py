"""``dgq_eoq``: an Ensemble of Quantized models (QT-DoG Eq. 6) trained and evaluated with WILDS.

    dgq_eoq --members 5 --log_dir runs/eoq -- --plugin dg_quant.qtdog --bits 7
    dgq_eoq --members 5 --parallel 2 --devices cuda:0 cuda:1 --log_dir runs/eoq -- -p dg_quant.qtdog
    dgq_eoq --from_runs runs/qtdog_seed0 runs/qtdog_seed1 --log_dir runs/eoq   # no training

Arguments after ``--`` (or any this command does not know) go to ``wilds_run``; member ``i``
trains with seed ``seeds[i]`` into ``<log_dir>/member<i>``. A finished member is reused and an
interrupted one resumed. Each member's best in-domain-validation state (``best_model.pt``) is
ensembled by averaging logits; every split is evaluated with the dataset's own ``eval``.

Results in ``log_dir``: ``eoq.json`` (members' and ensemble's metrics, sizes) and
``eoq_model.pt`` (every member's model file; ``load_eoq_model`` rebuilds the ensemble).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dg_quant.adapters.wilds.checkpoints import (
    build_model,
    checkpoint_path,
    eval_loader,
    load_run_model,
    predict,
    present_splits,
    read_checkpoint,
    split_metrics,
)
from dg_quant.adapters.wilds.datasets import FULL_SPLITS, SubsetSpec
from dg_quant.ensemble import LogitEnsemble, ensemble_size
from dg_quant.errors import ConfigError, run_command
from dg_quant.io import atomic_torch_save, atomic_write_json, load_torch_file
from dg_quant.options import CommandParser, HelpFormatter, plain_text

PROG = "dgq_eoq"
DATA_KEYS = ("dataset", "test_domain", "split_seed", "holdout_fraction", "split_scheme", "frac")
RESERVED = ("--seed", "--log_dir", "--resume")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog=PROG, description=plain_text(__doc__), allow_abbrev=False, formatter_class=HelpFormatter
    )
    parser.add_argument("--members", "-E", type=int, default=5, help="ensemble size E (QT-DoG: 5)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="member seeds (overrides --members); None means 0..E-1"
    )
    parser.add_argument("--log_dir", required=True, help="ensemble folder; members go to member<i>/ inside")
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="train this many members at once in separate processes (1: in this process)",
    )
    parser.add_argument(
        "--devices", nargs="+", default=None, help="devices dealt round-robin to members (e.g. cuda:0 cuda:1)"
    )
    parser.add_argument(
        "--from_runs",
        nargs="+",
        default=None,
        metavar="RUN",
        help="ensemble these finished runs instead of training members",
    )
    parser.add_argument(
        "--which",
        choices=("best", "last"),
        default="best",
        help="member state: best in-domain validation (paper) or last step",
    )
    parser.add_argument("--splits", nargs="+", default=None, help="splits to evaluate (default: all but train)")
    parser.add_argument("--device", default="cpu", help="device for the ensemble evaluation")
    parser.add_argument("--eval_batch_size", type=int, default=256, help="batch size of the ensemble's evaluation")
    return parser


def member_argv(base: Sequence[str], seed: int, log_dir: Path, device: str | None) -> list[str]:
    """``wilds_run`` arguments of one member; resumes it if it was interrupted."""
    argv = [*base, "--seed", str(seed), "--log_dir", str(log_dir), "--no_progress"]
    if device is not None:
        argv += ["--device", device]
    if (log_dir / "last.pt").exists():
        argv.append("--resume")
    return argv


def train_members(
    base: Sequence[str], seeds: Sequence[int], log_dir: Path, parallel: int, devices: Sequence[str] | None
) -> list[Path]:
    """Train (or finish) every member; finished members are reused as they are."""
    from dg_quant.adapters.wilds.cli import main as wilds_main

    dirs = [log_dir / f"member{i}" for i in range(len(seeds))]
    todo = [(i, d) for i, d in enumerate(dirs) if not (d / "final.json").is_file()]
    jobs = [member_argv(base, seeds[i], d, devices[i % len(devices)] if devices else None) for i, d in todo]
    if parallel <= 1:
        for (i, _), argv in zip(todo, jobs):
            print(f"{PROG}: training member {i} (seed {seeds[i]})", file=sys.stderr)
            if wilds_main(argv) != 0:
                raise ConfigError(f"member {i} failed (wilds_run {' '.join(argv)}); fix the error above")
        return dirs
    # members in parallel: submitit jobs on this machine (dgq_sweep's launcher), logs in .submitit/
    from dg_quant.adapters.wilds.sweep import local_executor, run_waves, wilds_job

    for i, _ in todo:
        print(f"{PROG}: member {i} (seed {seeds[i]}) in a separate process", file=sys.stderr)
    codes = run_waves(local_executor(log_dir / ".submitit"), wilds_job, jobs, parallel)
    failed = [(i, argv) for (i, _), argv, rc in zip(todo, jobs, codes) if rc != 0]
    if failed:
        i, argv = failed[0]
        raise ConfigError(
            f"{len(failed)} member(s) failed, e.g. member {i}: wilds_run {' '.join(argv)} "
            f"(its log: {log_dir / '.submitit'})"
        )
    return dirs


def check_same_data(configs: Sequence[argparse.Namespace], runs: Sequence[Path]) -> None:
    """Members must share the data and split, or their ensemble is not evaluated on held-out data."""
    first = {k: getattr(configs[0], k, None) for k in DATA_KEYS}
    for config, run in zip(configs[1:], runs[1:]):
        other = {k: getattr(config, k, None) for k in DATA_KEYS}
        diff = [k for k in DATA_KEYS if first[k] != other[k]]
        if diff:
            raise ConfigError(f"{run} differs from {runs[0]} in {', '.join(diff)}; ensemble runs on the same data")


@torch.no_grad()
def evaluate_ensemble(
    members: Sequence[torch.nn.Module],
    dataset: Any,
    splits: Sequence[str],
    device: str,
    batch_size: int,
    subsets: SubsetSpec = FULL_SPLITS,
) -> dict[str, Any]:
    """Metrics of each member and of their logit mean, computed from the same member logits."""
    results: dict[str, Any] = {"members": [{} for _ in members], "ensemble": {}}
    for split in splits:
        logits = []
        for m in members:
            out, y, meta = predict(m, eval_loader(dataset, split, m, batch_size, subsets), device)
            logits.append(out)
        for record, out in zip(results["members"], logits):
            record.update(split_metrics(dataset, split, out, y, meta))
        results["ensemble"].update(split_metrics(dataset, split, torch.stack(logits).mean(dim=0), y, meta))
    return results


def export(path: Path, runs: Sequence[Path], which: str) -> None:
    """All members' model files in one file, so the ensemble can be rebuilt without the runs."""
    members = [read_checkpoint(checkpoint_path(r, which)) for r in runs]
    atomic_torch_save(path, {"kind": "eoq", "which": which, "runs": [str(r) for r in runs], "members": members})


def load_eoq_model(path: str | Path, device: str | torch.device = "cpu") -> LogitEnsemble:
    """Rebuild the ensemble written to ``eoq_model.pt``."""
    state = load_torch_file(path, map_location=device)
    if not isinstance(state, dict) or state.get("kind") != "eoq":
        raise ConfigError(f"{path} is not an EoQ export (written by dgq_eoq)")
    members = [build_model(m, argparse.Namespace(**m["config"])) for m in state["members"]]
    return LogitEnsemble(members).to(device).eval()


def run_eoq(args: argparse.Namespace, wilds_args: Sequence[str]) -> dict[str, Any]:
    log_dir = Path(args.log_dir)
    if args.from_runs:
        runs = [Path(r) for r in args.from_runs]
    else:
        bad = [a for a in wilds_args if a.split("=", 1)[0] in RESERVED]
        if bad:
            raise ConfigError(f"{', '.join(bad)} is set by {PROG} per member; use --seeds and --log_dir instead")
        seeds = args.seeds if args.seeds is not None else list(range(args.members))
        if len(seeds) != len(set(seeds)) or len(seeds) < 1:
            raise ConfigError(f"--seeds must be distinct and at least one; got {seeds}")
        runs = train_members(wilds_args, seeds, log_dir, args.parallel, args.devices)
    loaded = [load_run_model(r, args.which, args.device) for r in runs]
    check_same_data([lr.config for lr in loaded], runs)
    dataset = loaded[0].load_dataset()
    splits = args.splits or present_splits(dataset)
    members = [lr.model for lr in loaded]
    results = evaluate_ensemble(
        members, dataset, splits, args.device, args.eval_batch_size, SubsetSpec.of(loaded[0].config)
    )
    size = ensemble_size(members)
    summary = {
        "members": [str(r) for r in runs],
        "which": args.which,
        "splits": list(splits),
        "member_results": results["members"],
        "ensemble": results["ensemble"],
        "size": size.to_dict(),
    }
    atomic_write_json(log_dir / "eoq.json", summary)
    export(log_dir / "eoq_model.pt", runs, args.which)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = []
    for split in summary["splits"]:
        key = f"{split}/acc_avg"
        accs = [m.get(key) for m in summary["member_results"]]
        lines.append(
            f"{split:<7} ensemble {summary['ensemble'][key]:.4f} | members "
            + " ".join(f"{a:.4f}" for a in accs)
            + f" (mean {sum(accs) / len(accs):.4f})"
        )
    s = summary["size"]
    lines.append(
        f"EoQ of {s['members']}: {s['ensemble_packed_mb']:.3f} MiB packed vs one FP32 model "
        f"{s['fp_model_mb']:.3f} MiB ({s['ensemble_over_fp']:.2f}x)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        cut = argv.index("--")
        own, wilds_args = argv[:cut], argv[cut + 1 :]
        args = build_parser().parse_args(own)
    else:
        args, wilds_args = build_parser().parse_known_args(argv)
    return run_command(PROG, lambda: print(format_summary(run_eoq(args, wilds_args))))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
