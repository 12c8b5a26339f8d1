"""``dgq_export``: write a saved ``wilds_run`` model as a bit-packed file and report its real size.

    dgq_export runs/pacs_qtdog_seed0 -o qtdog.dgq                 # best_model.pt
    dgq_export runs/pacs_erm_seed0 -o obc.dgq --checkpoint runs/pacs_erm_seed0/ptq_obc_w7.pt
    dgq_export runs/pacs_fqat_seed0 --format onnx -o fqat.onnx --verify   # ONNX QDQ graph
    dgq_export runs/pacs_fqat_w4 --format onnx --int4 -o fqat_w4.onnx     # 4-bit weights as ONNX INT4

The file holds the b-bit integer weights bit-packed with their per-channel steps (INQ weights as
b-bit sign + exponent codes) and everything else (BatchNorm, biases, the FP classifier) as is;
``dg_quant.quant.export.load_export`` rebuilds a model whose outputs equal the fake-quant model's.
``--verify`` checks that on a batch of the run's test data. ``--format onnx`` writes an ONNX QDQ
graph instead (``dg_quant.deploy.onnx``: int8 weights with their steps, activation
QuantizeLinear/DequantizeLinear); its ``--verify`` runs it in onnxruntime on test images and
reports the logit difference and top-1 agreement with the fake-quant model.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dg_quant.deploy.onnx import BIAS_ERROR_THRESHOLD
from dg_quant.errors import CheckpointError, ConfigError, run_command
from dg_quant.options import CommandParser, HelpFormatter, plain_text

PROG = "dgq_export"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog=PROG, description=plain_text(__doc__), formatter_class=HelpFormatter)
    parser.add_argument("run_dir", help="a finished wilds_run folder")
    parser.add_argument("-o", "--output", required=True, help="the file to write (e.g. model.dgq)")
    parser.add_argument(
        "--checkpoint",
        default="best",
        help="best (best_model.pt), last (model.pt) or the path of a model file such as ptq_obc_w7.pt",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="reload the file and check its outputs equal the checkpoint's on a test batch "
        "(onnx: run it in onnxruntime and compare logits and top-1)",
    )
    parser.add_argument(
        "--format",
        choices=("dgq", "onnx"),
        default="dgq",
        help="dgq: dg-quant's bit-packed file; onnx: an ONNX QDQ graph (needs dg-quant[onnx])",
    )
    parser.add_argument(
        "--no_fold_batchnorm",
        action="store_true",
        help="onnx: keep BatchNorm as its own op (the fake-quant arithmetic op for op, "
        "but no int8 kernels for the convolution before it)",
    )
    parser.add_argument(
        "--int4",
        action="store_true",
        help="onnx: store weights of 4 bits or fewer as ONNX INT4 (opset 21; half the bytes of int8; "
        "onnxruntime unpacks them to float at load, so those layers run at float speed)",
    )
    parser.add_argument(
        "--low_bit_int8_kernels",
        action="store_true",
        help="onnx: let onnxruntime run every convolution between activation quantizers below 8 bits as int8 "
        "QLinearConv (faster; by default those whose bias QLinearConv would round by more than "
        "--float_conv_threshold run in float, because the rounding moves 4-bit codes and top-1 agreement "
        "with the fake-quant model drops, see docs/ptq_export.md)",
    )
    parser.add_argument(
        "--float_conv_threshold",
        type=float,
        default=None,
        help="onnx: a convolution between activation quantizers below 8 bits stays int8 QLinearConv where "
        "its bias rounding (half the bias unit after widening) is at most this many output steps, and "
        f"runs in float elsewhere (default {BIAS_ERROR_THRESHOLD}; see docs/ptq_export.md)",
    )
    parser.add_argument("--verify_images", type=int, default=64, help="onnx: test images --verify compares on")
    parser.add_argument(
        "--verify_only",
        action="store_true",
        help="onnx: do not export; verify the existing file -o against the run's checkpoint",
    )
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
    from dg_quant.registry import rebuild_adapter

    path = _resolve(args.run_dir, args.checkpoint)
    state = read_checkpoint(path)
    config = argparse.Namespace(**state["config"])
    config.plugins = list(getattr(config, "plugins", None) or [])
    model = build_model(state, config).eval()
    if getattr(args, "format", "dgq") == "onnx":
        return _export_onnx(args, model, config)
    meta = {
        "backbone": state["backbone"],
        "num_classes": int(state["num_classes"]),
        "source": str(path),
        "plugins": config.plugins,
        "backbone_kwargs": adapter_kwargs(config, reload=True),
    }
    report = export_model(model, args.output, meta)
    out = {
        **report.to_dict(),
        "fp32_torch_save_bytes": torch_save_bytes(model),
        "output": args.output,
        "table": report.table(),
    }
    if args.verify:
        x = _test_batch(model, config)
        with torch.no_grad():
            same = torch.equal(load_export(args.output, rebuild_adapter)(x), model(x))
        if not same:
            raise CheckpointError(f"{args.output} does not reproduce the checkpoint's outputs; please report this")
        out["verified_on"] = list(x.shape)
    return out


def _export_onnx(args: argparse.Namespace, model: torch.nn.Module, config: argparse.Namespace) -> dict[str, Any]:
    from dg_quant.deploy.onnx import export_onnx, verify_onnx

    verify_only = getattr(args, "verify_only", False)
    batches = _test_batches(model, config, max(args.verify_images, 1) if args.verify or verify_only else 1)
    if verify_only:
        out = {
            "format": "onnx",
            "output": args.output,
            "verify_only": True,
            "verification": verify_onnx(args.output, model, batches).to_dict(),
        }
        return out
    report = export_onnx(
        model,
        batches[0][:1],
        args.output,
        fold_batchnorm=not args.no_fold_batchnorm,
        int4=getattr(args, "int4", False),
        low_bit_int8_kernels=getattr(args, "low_bit_int8_kernels", False),
        float_conv_threshold=_threshold(getattr(args, "float_conv_threshold", None)),
        metadata=_onnx_metadata(model, config),
    )
    out = {**report.to_dict(), "format": "onnx", "output": args.output}
    if args.verify:
        out["verification"] = verify_onnx(args.output, model, batches).to_dict()
    return out


def _threshold(value: float | None) -> float:
    """``--float_conv_threshold``, or the default; a negative or non-finite value is a one-line error."""
    if value is None:
        return BIAS_ERROR_THRESHOLD
    if not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"--float_conv_threshold must be a finite number >= 0 (got {value}); "
            "use --low_bit_int8_kernels to keep every convolution as QLinearConv"
        )
    return value


def _onnx_metadata(model: torch.nn.Module, config: argparse.Namespace) -> dict[str, str]:
    """What a user needs to feed the graph without dg-quant: the class names and, when the run's
    evaluation transform is Resize((s, s)) + ToTensor + Normalize, the size and the normalisation."""
    import json

    from dg_quant.adapters.wilds.checkpoints import _load_dataset
    from dg_quant.adapters.wilds_compat import import_wilds

    meta = {"dg_quant.backbone": str(getattr(config, "model", "")), "dg_quant.dataset": str(config.dataset)}
    import_wilds()
    names = getattr(_load_dataset(config), "class_names", None)
    if names:
        meta["dg_quant.classes"] = json.dumps([str(n) for n in names])
    steps = list(getattr(getattr(model, "transform", None), "transforms", []))
    kinds = [type(t).__name__ for t in steps]
    if kinds == ["Resize", "ToTensor", "Normalize"]:
        size = steps[0].size
        size = size if isinstance(size, int) else size[0] if len(set(size)) == 1 else None
        if size:
            meta["dg_quant.image_size"] = str(size)
            meta["dg_quant.normalize_mean"] = json.dumps([float(v) for v in steps[2].mean])
            meta["dg_quant.normalize_std"] = json.dumps([float(v) for v in steps[2].std])
    return meta


def _test_batch(model: torch.nn.Module, config: argparse.Namespace) -> torch.Tensor:
    return _test_batches(model, config, 16)[0]


def _test_batches(model: torch.nn.Module, config: argparse.Namespace, images: int) -> list[torch.Tensor]:
    """Up to ``images`` test (else first present split) inputs of the run, in batches of 16."""
    from dg_quant.adapters.wilds.checkpoints import _load_dataset, eval_loader, present_splits
    from dg_quant.adapters.wilds_compat import import_wilds

    import_wilds()
    dataset = _load_dataset(config)
    split = "test" if "test" in present_splits(dataset) else present_splits(dataset, exclude=())[0]
    batches, seen = [], 0
    for x, _y, _meta in eval_loader(dataset, split, model, batch_size=16):
        batches.append(x[: images - seen])
        seen += len(batches[-1])
        if seen >= images:
            break
    return batches


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: _print_export(export_run(args)))


def _print_export(out: dict) -> None:
    if out.get("format") == "onnx":
        _print_onnx(out)
        return
    print(out["table"])
    print(
        f"torch.save of the FP32 model: {out['fp32_torch_save_bytes'] / 2**20:.3f} MiB "
        f"(file is {out['file_bytes'] / max(out['fp32_torch_save_bytes'], 1):.3f} of it)"
    )
    if out["escape_params"]:
        print(
            f"note: {out['escape_params']} INQ weights were still training in this checkpoint (an "
            "unfinished partition) and are stored in FP32; export --checkpoint last for the fully "
            "quantized model"
        )
    if "verified_on" in out:
        print(f"verified: outputs equal on a test batch of shape {tuple(out['verified_on'])}")
    print(f"wrote {out['output']}")


def _print_onnx(out: dict) -> None:
    if out.get("verify_only"):
        _print_verification(out["verification"])
        return
    acts = sum(1 for t in out["layers"] if t["kind"] == "activation")
    bits = sorted({t["bits"] for t in out["layers"]})
    int4 = f" ({out['int4_weights']} of them INT4)" if out.get("int4_weights") else ""
    print(
        f"ONNX QDQ graph: {out['int_weights']} int8 weight tensors{int4} ({out['int_weight_params']:,} weights, "
        f"bits {bits or 'none'}), {acts} activation quantize/dequantize pairs, "
        f"{out['float_params']:,} float parameters, {out['folded_batchnorms']} BatchNorms folded; "
        f"{out['file_bytes'] / 2**20:.3f} MiB"
    )
    low_int, low_float = out.get("low_bit_int8_convs", 0), out.get("low_bit_float_convs", 0)
    if low_int or low_float:
        print(
            f"convolutions between activation quantizers below 8 bits: {low_int} int8 QLinearConv, "
            f"{low_float} float (QLinearConv would round their bias by more than the threshold)"
        )
    if not out["layers"]:
        print(
            "note: this checkpoint has no active quantizers (saved before quantization started?); "
            "the graph is all float"
        )
    if out.get("verification"):
        _print_verification(out["verification"])
    print(f"wrote {out['output']}")


def _print_verification(v: dict) -> None:
    print(f"verified in onnxruntime on {v['images']} test images (largest logit {v['max_logit']:.3g}):")
    for key, label in (
        ("optimized", "as deployed (graph optimizations on)"),
        ("op_for_op", "op for op (optimizations off)"),
    ):
        a = v[key]
        print(
            f"  {label}: top-1 agreement {100 * a['top1_agreement']:.2f}%, "
            f"max |logit difference| {a['max_abs_diff']:.3g} (mean {a['mean_abs_diff']:.3g})"
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
