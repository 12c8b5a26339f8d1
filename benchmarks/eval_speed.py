"""Evaluation throughput of ``wilds_run`` on CPU: images/s of ``Run.evaluate`` on real PACS.

    python benchmarks/eval_speed.py --root_dir data --weights mobilenet_v2-b0353104.pth
    python benchmarks/eval_speed.py --root_dir data --variants "batch16, 1 thread" "batch64, 1 thread"

Each variant builds the run as ``wilds_run`` would (MobileNetV2, DomainBed-layout PACS at
``--image_size``, the test domain only, ``--frac`` of it) and times ``evaluate()`` (the first
call warms up); variants run interleaved, ``--repeats`` rounds, and the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = {
    "batch16, 2 threads (before)": {"eval_batch_size": 16, "threads": 2},
    "batch16, 1 thread": {"eval_batch_size": 16, "threads": 1},
    "batch64, 1 thread": {"eval_batch_size": 64, "threads": 1},
    "batch64, 1 thread, inference_mode": {"eval_batch_size": 64, "threads": 1, "inference_mode": True},
    "batch64, 1 thread, channels_last": {"eval_batch_size": 64, "threads": 1, "channels_last": True},
    "batch64, 1 thread, 1 worker": {"eval_batch_size": 64, "threads": 1, "num_workers": 1},
}


def build(args: argparse.Namespace, variant: dict):
    from dg_quant.adapters.wilds.cli import parse_config
    from dg_quant.adapters.wilds.runner import Run

    argv = [
        "-d",
        "pacs",
        "--root_dir",
        args.root_dir,
        "--test_domain",
        "sketch",
        "--model",
        "mobilenet_v2",
        "--image_size",
        str(args.image_size),
        "--eval_splits",
        "test",
        "--frac",
        str(args.frac),
        "--batch_size",
        "8",
        "--eval_batch_size",
        str(variant["eval_batch_size"]),
        "--no_progress",
        "--device",
        "cpu",
        "--log_dir",
        str(Path(tempfile.gettempdir()) / "eval_speed_unused"),
        "--num_workers",
        str(variant.get("num_workers", 0)),
        "--channels_last",
        str(variant.get("channels_last", False)).lower(),
        *([f"--weights={args.weights}"] if args.weights else []),
    ]
    if args.plugin:
        argv += ["--plugin", args.plugin, "--quant_start_step", "0"]
    config, host = parse_config(argv)
    return Run(config, host)


def time_eval(run, variant: dict) -> float:
    torch.set_num_threads(variant["threads"])
    n = sum(len(loader.dataset) for loader in run.eval_loaders.values())
    start = time.perf_counter()
    if variant.get("inference_mode"):
        with torch.inference_mode():
            run.evaluate()
    else:
        run.evaluate()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root_dir", required=True, help="folder holding PACS/")
    parser.add_argument("--weights", default=None, help="torchvision MobileNetV2 ImageNet state dict")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--frac", type=float, default=0.05, help="fraction of the test domain evaluated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plugin", default=None, help="e.g. dg_quant.qtdog: a quantized model")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = parser.parse_args()
    runs = {name: build(args, VARIANTS[name]) for name in args.variants}
    for name, run in runs.items():
        time_eval(run, VARIANTS[name])  # warm-up: first JPEG reads, allocator
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            speeds[name].append(time_eval(run, VARIANTS[name]))
    images = sum(len(loader.dataset) for loader in next(iter(runs.values())).eval_loaders.values())
    print(
        f"PACS sketch, {images} images at {args.image_size} px, MobileNetV2"
        f"{' + ' + args.plugin if args.plugin else ''}; load average {os.getloadavg()[0]:.1f}"
    )
    for name, values in speeds.items():
        print(
            f"{name:<40} {statistics.median(values):7.1f} images/s  (rounds: "
            + " ".join(f"{v:.1f}" for v in values)
            + ")"
        )
    print(json.dumps({name: statistics.median(v) for name, v in speeds.items()}))


if __name__ == "__main__":
    main()
