"""A trained PACS run deployed: top-1 on the held-out domain of the fake-quant model, its ONNX file in
onnxruntime and its torchao conversion, with file sizes and batch-32 latency, on the same images.

    dgq_export runs/pacs_fqat fqat.onnx --format onnx --verify            # the one export command
    python benchmarks/pacs_deploy.py runs/pacs_fqat fqat.onnx --folder PACS/sketch

Every image goes through the run's evaluation transform (``model.transform``) once; the same
tensors feed every model, so differences are the deployment's, not the preprocessing's.
Latency is CPU time per image at batch 32 (``--threads`` threads), the models interleaved.
``benchmarks/pacs_deploy_table.py`` runs this over a set of runs (backbones x methods).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

Runner = Callable[[torch.Tensor], np.ndarray]


def load_run(run_dir: str | Path, checkpoint: str = "best") -> tuple[torch.nn.Module, Path]:
    """The run's fake-quant model in eval mode (``model.transform`` is its evaluation transform)."""
    from dg_quant.adapters.wilds.checkpoints import build_model, read_checkpoint
    from dg_quant.adapters.wilds.export import _resolve

    path = _resolve(str(run_dir), checkpoint)
    state = read_checkpoint(path)
    config = argparse.Namespace(**state["config"])
    config.plugins = list(getattr(config, "plugins", None) or [])
    return build_model(state, config).eval(), path


def held_out_images(
    folder: Path, classes: list[str], transform: Callable, every: int = 1
) -> tuple[torch.Tensor, np.ndarray]:
    """Every ``every``-th image of each ``folder/CLASS/`` (sorted names, so a fixed stratified
    subset), through ``transform``; returns the input batch and the labels."""
    from PIL import Image

    files, labels = [], []
    for k, name in enumerate(classes):
        found = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        files += found[::every]
        labels += [k] * len(found[::every])
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    return x, np.asarray(labels)


def runners(model: torch.nn.Module, onnx_path: str | Path, threads: int, op_for_op: bool = False) -> dict[str, Runner]:
    """Logit functions of the fake-quant model, the ONNX file as deployed (graph optimizations on),
    optionally op for op (off), and the torchao conversion."""
    from dg_quant.deploy.onnx import onnx_session
    from dg_quant.deploy.torchao import to_torchao

    deployed = onnx_session(onnx_path, threads=threads)
    ao_model, _converted = to_torchao(model)
    out: dict[str, Runner] = {
        "fake_quant": lambda b: model(b).numpy(),
        "onnx": lambda b: deployed.run(None, {"input": b.numpy()})[0],
    }
    if op_for_op:
        plain = onnx_session(onnx_path, threads=threads, optimize=False)
        out["onnx_op_for_op"] = lambda b: plain.run(None, {"input": b.numpy()})[0]
    out["torchao"] = lambda b: ao_model(b).float().numpy()
    out["_torchao_model"] = ao_model  # type: ignore[assignment]  # for torchao_layers; not a runner
    return out


def predict(run: dict[str, Runner], x: torch.Tensor, batch: int = 32) -> dict[str, np.ndarray]:
    """Each runner's logits on ``x``."""
    with torch.inference_mode():
        return {k: np.concatenate([f(b) for b in x.split(batch)]) for k, f in run.items() if not k.startswith("_")}


def latency_ms(run: dict[str, Runner], x: torch.Tensor, batch: int, rounds: int) -> dict[str, float]:
    """Median milliseconds per image at ``batch``, the runners interleaved in rotating order.

    The clock is the process's CPU time (``time.process_time``): on a machine shared with other
    jobs, wall time also counts the time the scheduler gives to them. With one intra-op thread
    both runtimes compute in this process, so CPU time is their compute time.
    """
    keys = [k for k in run if not k.startswith("_")]
    times: dict[str, list[float]] = {k: [] for k in keys}
    sample = x[:batch]
    with torch.inference_mode():
        for key in keys:  # warm-up
            run[key](sample)
        for r in range(rounds):
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                tic = time.process_time()
                run[key](sample)
                times[key].append((time.process_time() - tic) / len(sample))
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def compare(logits: dict[str, np.ndarray], y: np.ndarray) -> dict[str, Any]:
    """Top-1, agreement with the fake-quant model, and the logit margins behind any disagreement.

    The margin of an image is the fake-quant model's top-1 minus top-2 logit. If the deployed
    arithmetic is the trained one up to rounding, only images whose margin is about the size of
    the logit differences change their prediction.
    """
    ref = logits["fake_quant"]
    top2 = np.sort(ref, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    out: dict[str, Any] = {
        "top1": {k: float((v.argmax(1) == y).mean()) for k, v in logits.items()},
        "agreement_with_fake_quant": {k: float((v.argmax(1) == ref.argmax(1)).mean()) for k, v in logits.items()},
        "fake_quant_margin_median": float(np.median(margin)),
        "fake_quant_logit_range_median": float(np.median(ref.max(1) - ref.min(1))),
        "deployment": {},
    }
    for key, v in logits.items():
        if key == "fake_quant":
            continue
        diff = np.abs(v.astype(np.float64) - ref)
        flipped = v.argmax(1) != ref.argmax(1)
        out["deployment"][key] = {
            "mean_abs_logit_diff": float(diff.mean()),
            "p99_max_abs_logit_diff": float(np.quantile(diff.max(1), 0.99)),
            "flipped": int(flipped.sum()),
            "flipped_margin_max": float(margin[flipped].max()) if flipped.any() else 0.0,
            "flipped_margin_median": float(np.median(margin[flipped])) if flipped.any() else 0.0,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("onnx")
    parser.add_argument("--folder", type=Path, required=True, help="CLASS/ image folders of the held-out domain")
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument("--every", type=int, default=1, help="use every N-th image of each class (a subset)")
    parser.add_argument("--op_for_op", action="store_true", help="also run the ONNX file with optimizations off")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pacs_deploy"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from dg_quant.deploy.onnx import onnx_session
    from dg_quant.deploy.torchao import torchao_layers

    model, path = load_run(args.run_dir, args.checkpoint)
    meta = onnx_session(args.onnx, threads=1).get_modelmeta().custom_metadata_map
    x, y = held_out_images(args.folder, json.loads(meta["dg_quant.classes"]), model.transform, args.every)
    run = runners(model, args.onnx, args.threads, args.op_for_op)
    kinds = list(torchao_layers(run["_torchao_model"]).values())  # type: ignore[arg-type]
    result = {
        "run": str(args.run_dir),
        "checkpoint": str(path),
        "images": len(y),
        "folder": str(args.folder),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "threads": args.threads,
        "onnx_bytes": Path(args.onnx).stat().st_size,
        **compare(predict(run, x), y),
        "ms_per_image_b32": latency_ms(run, x, 32, args.rounds),
        "torchao_layers": {kind: kinds.count(kind) for kind in set(kinds)},
        "torchao_converted": len(kinds),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
