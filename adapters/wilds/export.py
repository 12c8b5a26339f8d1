"""``dgq_export``: write a saved ``wilds_run`` model as a bit-packed file and report its real size.

    dgq_export runs/pacs_qtdog_seed0 -o qtdog.dgq                 # best_model.pt
    dgq_export runs/pacs_erm_seed0 -o obc.dgq --checkpoint runs/pacs_erm_seed0/ptq_obc_w7.pt

The file holds the b-bit integer weights bit-packed with their per-channel steps (INQ weights as
b-bit sign + exponent codes) and everything else (BatchNorm, biases, the FP classifier) as is;
``dg_quant.quant.export.load_export`` rebuilds a model whose outputs equal the fake-quant model's.
``--verify`` checks that on a batch of the run's test data.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dg_quant.errors import CheckpointError, run_command

PROG = "dgq_export"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run_dir", help="a finished wilds_run folder")
    parser.add_argument("-o", "--output", required=True, help="the file to write (e.g. model.dgq)")
    parser.add_argument("--checkpoint", default="best",
                        help="best (best_model.pt), last (model.pt) or the path of a model file such as ptq_obc_w7.pt")
    parser.add_argument("--verify", action="store_true",
                        help="reload the file and check its outputs equal the checkpoint's on a test batch")
    return parser


def _resolve(run_dir: str, checkpoint: str) -> Path:
    from dg_quant.adapters.wilds.checkpoints import checkpoint_path

    if checkpoint in ("best", "last"):
        return checkpoint_path(run_dir, checkpoint)
    path = Path(checkpoint)
    if not path.is_file() and (Path(run_dir) / checkpoint).is_file():
        path = Path(run_dir) / checkpoint
    if not path.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} not found; give best, last or a model file path")
    return path


def export_run(args: argparse.Namespace) -> dict[str, Any]:
    """Export the run's checkpoint; returns the size report (and the verification) as a dict."""
    from dg_quant.adapters.wilds.checkpoints import build_model, read_checkpoint
    from dg_quant.adapters.wilds.run_model import adapter_kwargs
    from dg_quant.quant.export import export_model, load_export, torch_save_bytes

    path = _resolve(args.run_dir, args.checkpoint)
    state = read_checkpoint(path)
    config = argparse.Namespace(**state["config"])
    config.plugins = list(getattr(config, "plugins", None) or [])
    model = build_model(state, config).eval()
    meta = {"backbone": state["backbone"], "num_classes": int(state["num_classes"]), "source": str(path),
            "plugins": config.plugins, "backbone_kwargs": adapter_kwargs(config, reload=True)}
    report = export_model(model, args.output, meta)
    out = {**report.to_dict(), "fp32_torch_save_bytes": torch_save_bytes(model), "output": args.output,
           "table": report.table()}
    if args.verify:
        x = _test_batch(model, config)
        with torch.no_grad():
            same = torch.equal(load_export(args.output)(x), model(x))
        if not same:
            raise CheckpointError(f"{args.output} does not reproduce the checkpoint's outputs; please report this")
        out["verified_on"] = list(x.shape)
    return out


def _test_batch(model: torch.nn.Module, config: argparse.Namespace) -> torch.Tensor:
    from dg_quant.adapters.wilds.checkpoints import _load_dataset, eval_loader, present_splits
    from dg_quant.adapters.wilds.compat import import_wilds

    import_wilds()
    dataset = _load_dataset(config)
    split = "test" if "test" in present_splits(dataset) else present_splits(dataset, exclude=())[0]
    x, _y, _meta = next(iter(eval_loader(dataset, split, model, batch_size=16)))
    return x


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: _print_export(export_run(args)))


def _print_export(out: dict) -> None:
    print(out["table"])
    print(f"torch.save of the FP32 model: {out['fp32_torch_save_bytes'] / 2**20:.3f} MiB "
          f"(file is {out['file_bytes'] / max(out['fp32_torch_save_bytes'], 1):.3f} of it)")
    if out["escape_params"]:
        print(f"note: {out['escape_params']} INQ weights were still training in this checkpoint (an "
              "unfinished partition) and are stored in FP32; export --checkpoint last for the fully "
              "quantized model")
    if "verified_on" in out:
        print(f"verified: outputs equal on a test batch of shape {tuple(out['verified_on'])}")
    print(f"wrote {out['output']}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
