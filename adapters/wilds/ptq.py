"""``dgq_ptq``: OBC/GPTQ post-training quantization of a saved ``wilds_run`` model.

    dgq_ptq runs/pacs_erm_seed0 --ptq_method obc --bits 7
    dgq_ptq runs/pacs_erm_seed0 --ptq_method gptq --bits 4 --ptq_bn_reestimate true --checkpoint last

The run is rebuilt with its own plugins plus ``dg_quant.obc``, whose flags (``--bits``,
``--ptq_*``, as for ``wilds_run --plugin dg_quant.obc``) set the quantization; then it ends as a
training run ends (``dgq_train_end``). Calibration images come from the run's training split (its
source domains; the held-out test domains are never seen), with the evaluation transform. Writes,
next to the run's checkpoints, ``ptq_<method>_w<bits>.pt`` (a model file that ``dgq_export`` and
``load_run_model``-style loaders read) and ``ptq_<method>_w<bits>.json``: per-layer
reconstruction error of the solver and of round-to-nearest, and the metrics of every split
before and after quantization.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dg_quant.errors import run_command
from dg_quant.host import PluginHost
from dg_quant.options import CommandParser, HelpFormatter, declared_options, plain_text

PROG = "dgq_ptq"
PTQ_PLUGIN = "dg_quant.obc"
RESULT_FILE = "ptq.json"  # what dg_quant.obc writes into the log_dir of dgq_train_end


def build_parser(host: PluginHost | None = None) -> CommandParser:
    """dgq_ptq's own flags plus those of ``host``'s plugins (default: ``dg_quant.obc`` alone:
    ``--bits``, ``--ptq_*``)."""
    host = host or PluginHost([PTQ_PLUGIN])
    parser = CommandParser(prog=PROG, description=plain_text(__doc__), formatter_class=HelpFormatter)
    parser.add_argument("run_dir", help="a finished wilds_run folder")
    parser.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="best_model.pt (best validation) or model.pt (last step)",
    )
    parser.add_argument("--seed", type=int, default=0, help="order of the calibration images")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--no_eval", action="store_true", help="skip evaluating the splits before and after")
    host.add_options(parser)
    return parser


def run_settings(
    saved: dict[str, Any], argv: Sequence[str]
) -> tuple[argparse.Namespace, argparse.Namespace, PluginHost]:
    """``(args, config, host)``: the command line parsed with the plugins of the saved run plus
    ``dg_quant.obc``; ``config`` is the saved settings with the plugins' options from the command
    line (an option not given keeps the run's value)."""
    plugins = list(dict.fromkeys([*(saved.get("plugins") or []), PTQ_PLUGIN]))
    host = PluginHost(plugins)
    parser = build_parser(host)
    fields = [f.name for cls in declared_options(parser) for f in dataclasses.fields(cls)]
    parser.set_defaults(**{name: saved[name] for name in fields if name in saved})
    args = parser.parse_args(list(argv))
    config = argparse.Namespace(**saved)
    for name in fields:
        setattr(config, name, getattr(args, name))
    config.plugins = plugins
    return args, config, host


def ptq_run(argv: Sequence[str]) -> dict[str, Any]:
    """Quantize the run's checkpoint as ``argv`` says; returns what the JSON file holds."""
    from dg_quant.adapters.wilds.calibration import TrainingCalibration
    from dg_quant.adapters.wilds.checkpoints import (
        build_model,
        checkpoint_path,
        evaluate_splits,
        present_splits,
        read_checkpoint,
        run_dataset,
    )
    from dg_quant.adapters.wilds.datasets import SubsetSpec
    from dg_quant.adapters.wilds_compat import import_wilds
    from dg_quant.io import atomic_torch_save, atomic_write_json
    from dg_quant.loop import end_training

    pre, _ = build_parser().parse_known_args(list(argv))  # --help; the run's own flags later
    import_wilds()
    device = torch.device(pre.device)
    source = checkpoint_path(pre.run_dir, pre.checkpoint)
    state = read_checkpoint(source, device)
    args, config, host = run_settings(state["config"], argv)
    model = build_model(state, config, host, added=(PTQ_PLUGIN,)).to(device).eval()
    dataset = run_dataset(config)
    subsets = SubsetSpec.of(config)
    calibration = TrainingCalibration(subsets.subset(dataset, "train", model.transform), device, args.seed)
    splits = [] if args.no_eval else present_splits(dataset)
    before = evaluate_splits(model, dataset, splits, device, subsets=subsets) if splits else {}
    with tempfile.TemporaryDirectory() as tmp:
        end_training(host, model, config, tmp, calibration)
        record = json.loads((Path(tmp) / RESULT_FILE).read_text())
    model.eval()
    after = evaluate_splits(model, dataset, splits, device, subsets=subsets) if splits else {}
    stem = f"ptq_{config.ptq_method}_w{config.bits}"
    run_dir = Path(args.run_dir)
    atomic_torch_save(
        run_dir / f"{stem}.pt",
        {
            "model": model.state_dict(),
            "backbone": config.model,
            "num_classes": int(dataset.n_classes),
            "config": {k: v for k, v in vars(config).items() if _plain(v)},
            "source_checkpoint": source.name,
        },
    )
    record |= {"source_checkpoint": source.name, "before": before, "after": after}
    atomic_write_json(run_dir / f"{stem}.json", record)
    return record | {"file": str(run_dir / f"{stem}.pt")}


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool | list | tuple | dict)


def format_result(record: dict[str, Any]) -> str:
    width = max(len(row["layer"]) for row in record["layers"])
    lines = [f"{'layer':<{width}}  solver  {'error':>11}  {'RTN error':>11}"]
    lines += [
        f"{r['layer']:<{width}}  {r['method']:>6}  {r['error']:11.4g}  {r['rtn_error']:11.4g}" for r in record["layers"]
    ]
    lines.append(
        f"{record['ptq/layers_better_than_rtn']}/{record['ptq/layers']} layers below round-to-nearest; "
        f"mean relative error {record['ptq/relative_error_mean']:.3g} "
        f"(RTN {record['ptq/relative_rtn_error_mean']:.3g})"
    )
    for key in sorted(k for k in record["after"] if k.endswith("acc_avg")):
        lines.append(f"{key}: {record['before'].get(key, float('nan')):.4f} -> {record['after'][key]:.4f}")
    lines.append(f"wrote {record['file']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(PROG, lambda: print(format_result(ptq_run(argv))))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
