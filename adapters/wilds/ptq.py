"""``dgq_ptq``: OBC/GPTQ post-training quantization of a saved ``wilds_run`` model.

    dgq_ptq runs/pacs_erm_seed0 --method obc --bits 7
    dgq_ptq runs/pacs_erm_seed0 --method gptq --bits 4 --bn_reestimate --checkpoint last

Calibration images come from the run's training split (its source domains; the held-out test
domains are never seen). Writes, next to the run's checkpoints, ``ptq_<method>_w<bits>.pt`` (a
model file that ``dgq_export`` and ``load_run_model``-style loaders read) and
``ptq_<method>_w<bits>.json``: per-layer reconstruction error of the solver and of
round-to-nearest, and the metrics of every split before and after quantization.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from dg_quant.errors import run_command
from dg_quant.options import CommandParser, HelpFormatter, plain_text

PROG = "dgq_ptq"
PTQ_PLUGIN = "dg_quant.obc"


def calibration_batches(
    subset: Any, num_samples: int, batch_size: int, device: torch.device | str, seed: int = 0
) -> Iterator[torch.Tensor]:
    """Up to ``num_samples`` shuffled inputs of ``subset`` (a WILDS subset of the training split).

    The order depends on ``seed`` only, so repeated calls (GPTQ's sequential passes, BN
    re-estimation) see the same images.
    """
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=True, generator=generator)
    seen = 0
    for x, _y, _meta in loader:
        if seen >= num_samples:
            break
        x = x[: num_samples - seen]
        seen += len(x)
        yield x.to(device)


def build_parser() -> argparse.ArgumentParser:
    from dg_quant.plugins.obc import ObcOptions

    defaults = ObcOptions()
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(ObcOptions)}
    parser = CommandParser(prog=PROG, description=plain_text(__doc__), formatter_class=HelpFormatter)
    parser.add_argument("run_dir", help="a finished wilds_run folder")
    parser.add_argument("--method", choices=("obc", "gptq"), default=defaults.ptq_method, help=helps["ptq_method"])
    parser.add_argument("--bits", type=int, default=defaults.bits, help=helps["bits"])
    parser.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="best_model.pt (best validation) or model.pt (last step)",
    )
    parser.add_argument("--samples", type=int, default=defaults.ptq_samples, help="calibration images")
    parser.add_argument("--batch_size", type=int, default=defaults.ptq_batch_size, help=helps["ptq_batch_size"])
    parser.add_argument("--obq_max_cols", type=int, default=defaults.ptq_obq_max_cols, help=helps["ptq_obq_max_cols"])
    parser.add_argument("--damp", type=float, default=defaults.ptq_damp, help=helps["ptq_damp"])
    parser.add_argument("--bn_reestimate", action="store_true", help="re-estimate BatchNorm statistics afterwards")
    parser.add_argument("--quantize_head", action="store_true", help="quantize the classifier too")
    parser.add_argument("--seed", type=int, default=0, help="order of the calibration images")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--no_eval", action="store_true", help="skip evaluating the splits before and after")
    return parser


def ptq_run(args: argparse.Namespace) -> dict[str, Any]:
    """Quantize the run's checkpoint; returns what the JSON file holds."""
    from dg_quant.adapters.wilds.checkpoints import (
        checkpoint_path,
        evaluate_splits,
        load_run_model,
        present_splits,
    )
    from dg_quant.adapters.wilds.compat import import_wilds
    from dg_quant.adapters.wilds.datasets import SubsetSpec
    from dg_quant.adapters.wilds.transforms import build_transforms
    from dg_quant.io import atomic_torch_save
    from dg_quant.options import read_options
    from dg_quant.plugins.obc import ObcOptions, write_results
    from dg_quant.quant.obc import attach_disabled_quantizers, ptq_

    import_wilds()
    device = torch.device(args.device)
    model, config, load_dataset = load_run_model(args.run_dir, args.checkpoint, device)
    settings = {
        "bits": args.bits,
        "ptq_method": args.method,
        "ptq_samples": args.samples,
        "ptq_batch_size": args.batch_size,
        "ptq_obq_max_cols": args.obq_max_cols,
        "ptq_damp": args.damp,
        "ptq_bn_reestimate": args.bn_reestimate,
        "ptq_quantize_head": args.quantize_head,
    }
    options = read_options(ObcOptions, argparse.Namespace(**settings))
    dataset = load_dataset()
    train_transform, _ = build_transforms(
        getattr(config, "transform", "model"), getattr(config, "image_size", None), model
    )
    subsets = SubsetSpec.of(config)
    train = subsets.subset(dataset, "train", train_transform)
    splits = [] if args.no_eval else present_splits(dataset)
    before = evaluate_splits(model, dataset, splits, device, subsets=subsets) if splits else {}
    attach_disabled_quantizers(model, options.ptq)  # the layout the obc plugin rebuilds on load
    results = ptq_(
        model, lambda: calibration_batches(train, args.samples, args.batch_size, device, args.seed), options.ptq
    )
    after = evaluate_splits(model, dataset, splits, device, subsets=subsets) if splits else {}
    stem = f"ptq_{args.method}_w{args.bits}"
    run_dir = Path(args.run_dir)
    saved = vars(config) | settings
    saved["plugins"] = list(dict.fromkeys(list(config.plugins) + [PTQ_PLUGIN]))
    atomic_torch_save(
        run_dir / f"{stem}.pt",
        {
            "model": model.state_dict(),
            "backbone": config.model,
            "num_classes": int(dataset.n_classes),
            "config": {k: v for k, v in saved.items() if _plain(v)},
            "source_checkpoint": checkpoint_path(args.run_dir, args.checkpoint).name,
        },
    )
    extra = {"source_checkpoint": checkpoint_path(args.run_dir, args.checkpoint).name, "before": before, "after": after}
    return write_results(run_dir / f"{stem}.json", options, results, extra) | {"file": str(run_dir / f"{stem}.pt")}


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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.samples <= 0 or args.batch_size <= 0:
        parser.error("--samples and --batch_size must be positive")
    return run_command(PROG, lambda: print(format_result(ptq_run(args))))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
