"""Benchmark harness: FP vs fake-quant training steps, side by side, on CPU or CUDA.

    python benchmarks/bench.py --device cpu --models digits_cnn resnet18 --plugins erm qtdog lsq_wa fqat

For every model, one copy per method is built from the same weights and batch; after warm-up,
the methods' steps are timed interleaved (rotating order, ``--repeats`` times ``--steps`` steps),
so ratios are measured side by side under the same load. Writes ``results/<device>.md`` and
``.json``. Exported-model inference (latency and size against FP) is timed with ``--inference``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import measure, report
from benchmarks.export_bench import inference_rows
from benchmarks.methods import METHODS, build_method
from benchmarks.models import MODELS, Workload, build
from dg_quant.errors import DGQuantError
from dg_quant.loop import Trainer
from dg_quant.quant.api import set_fused_layers

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--models",
        nargs="+",
        default=["digits_cnn", "resnet18", "deit_tiny"],
        help=f"{', '.join(MODELS)}, or any backbone of the adapter registry (random weights)",
    )
    p.add_argument(
        "--plugins",
        nargs="+",
        default=["erm", "qtdog", "lsq_wa", "sagm", "fqat"],
        choices=list(METHODS),
        help="methods to time; erm is always added as the FP baseline",
    )
    p.add_argument("--image-size", type=int, default=None, help="default 224 on CUDA, 64 on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="default per model and device")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported")
    p.add_argument("--steps", type=int, default=2, help="steps per method per round")
    p.add_argument(
        "--amp",
        choices=("auto", "none", "bf16", "fp16"),
        default="auto",
        help="autocast dtype; auto is bf16 on CUDA and none on CPU",
    )
    p.add_argument(
        "--channels_last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NHWC models and inputs; default on for CUDA",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile every model (all methods alike)")
    p.add_argument(
        "--quant-kernel",
        choices=("auto", "eager", "compiled"),
        default="auto",
        help="LSQ kernels of an eager model: eager, the fused torch.compile ones (set_compiled_kernels), or "
        "auto (compiled where a compiler is available: the runs' default)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--clock",
        choices=("auto", "wall", "process"),
        default="auto",
        help="wall time, or this process's CPU time (robust on a shared CPU); auto: process on CPU",
    )
    p.add_argument(
        "--inference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the exported (baked) quantized models against FP",
    )
    p.add_argument(
        "--ops",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="count the ATen ops of one step per method (one extra step each)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for <device>.md and .json")
    p.add_argument("--name", default=None, help="file stem; default the device type")
    args = p.parse_args(argv)
    if "erm" not in args.plugins:
        args.plugins = ["erm", *args.plugins]
    return args


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"{model} ({os.cpu_count()} cores)"


class Bench:
    """One harness run: its settings, and the trainers of the model being measured."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise DGQuantError("--device cuda but CUDA is not available; use --device cpu")
        cuda = self.device.type == "cuda"
        self.amp = ("bf16" if cuda else "none") if args.amp == "auto" else args.amp
        self.channels_last = cuda if args.channels_last is None else args.channels_last
        self.image_size = args.image_size or (224 if cuda else 64)
        self.clock = ("wall" if cuda else "process") if args.clock == "auto" else args.clock

    def _trainer(self, work: Workload, method: str, fallback: str | None, batch: tuple) -> tuple[Trainer, Any]:
        built = build_method(method, fallback)
        # The run's own speed settings (dg_quant.speed), as wilds_run and DomainBed apply them;
        # fp16 is harness-only (the Trainer offers bf16), so the step wraps it below.
        built.config.precision = "bf16" if self.amp == "bf16" else "fp32"
        built.config.channels_last = self.channels_last
        reference = METHODS[method].reference
        kernels = "eager" if reference else (METHODS[method].kernels or self.args.quant_kernel)
        # As a run's --compile: the whole-model compile fuses the quantizers, so auto keeps eager kernels.
        built.config.quant_kernels = "eager" if self.args.compile and kernels == "auto" else kernels
        model = copy.deepcopy(work.model).to(self.device)
        trainer = Trainer.build(
            built.host,
            model,
            built.config,
            lambda m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9),
            F.cross_entropy,
        )
        if reference:
            set_fused_layers(trainer.model, False)
        if self.args.compile:
            # One eager forward first: activation steps initialise from the first batch (a
            # data-dependent branch that would break the compiled graph into per-layer frames).
            with torch.no_grad(), measure.autocast(self.device, self.amp):
                trainer.model(batch[0])
            # In place, as a run's --compile does (speed.prepare_model): the trainer steps through
            # ``forward_model``, the same module object, so a rebound ``trainer.model`` would never run.
            trainer.model.compile()
        return trainer, built

    def _step_fn(self, trainer: Trainer, batch: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], object]:
        outer_amp = "fp16" if self.amp == "fp16" else "none"

        def step() -> object:
            with measure.autocast(self.device, outer_amp):
                return trainer.train_step(batch)

        return step

    def _warm(self, work: Workload, method: str, batch: tuple) -> tuple[Trainer, Any, Callable[[], object]]:
        """Build and warm up ``method``; an unfinished plugin falls back to the stand-in."""
        try:
            trainer, built = self._trainer(work, method, None, batch)
            step = self._step_fn(trainer, batch)
            for _ in range(self.args.warmup):
                step()
        except Exception as exc:  # noqa: BLE001 - record why, then time the stand-in
            if METHODS[method].fallback_plugins is None:
                raise
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:90]
            trainer, built = self._trainer(work, method, f"{type(exc).__name__}: {reason}", batch)
            step = self._step_fn(trainer, batch)
            for _ in range(self.args.warmup):
                step()
        return trainer, built, step

    def _saved_mb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float | None:
        """Activation memory of one forward; None for compiled models (the hooks would recompile)."""
        if self.args.compile:
            return None
        amp = measure.autocast(self.device, self.amp)
        return measure.forward_saved_mb(model, x, y, F.cross_entropy, amp)

    def model_rows(self, name: str) -> tuple[list[dict], list[dict]]:
        torch.manual_seed(0)
        work = build(name, self.image_size, self.args.batch_size, self.device)
        x = torch.randn(work.batch_size, *work.input_shape, device=self.device)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 7, (work.batch_size,), device=self.device)
        runs = {m: self._warm(work, m, (x, y)) for m in self.args.plugins}
        times = measure.interleaved_times(
            {m: run[2] for m, run in runs.items()},
            self.args.repeats,
            self.args.steps,
            self.device,
            self.clock,
        )
        rows = []
        for method, (trainer, built, step) in runs.items():
            ratios = [t / e for t, e in zip(times[method], times["erm"])]
            step_s = measure.median(times[method])
            rows.append(
                {
                    "model": name,
                    "method": method,
                    "label": built.label,
                    "batch": work.batch_size,
                    "step_ms": step_s * 1e3,
                    "ratio_vs_fp": measure.median(ratios),
                    # each method's least disturbed round against ERM's: robust where other jobs only add time
                    "ratio_best": min(times[method]) / min(times["erm"]),
                    "target": METHODS[method].target,
                    "samples_per_s": work.batch_size / step_s,
                    "saved_mb": self._saved_mb(trainer.model, x, y),
                    "peak_mb": measure.cuda_peak_mb(step, self.device),
                    "ops_per_step": measure.aten_ops(step) if self.args.ops and not self.args.compile else None,
                    "step_ms_all": [t * 1e3 for t in times[method]],
                    "note": built.note,
                }
            )
            print(
                f"{name:>10} {built.label:>8}: {step_s * 1e3:8.1f} ms/step  x{rows[-1]['ratio_vs_fp']:.2f} "
                f"(best rounds x{rows[-1]['ratio_best']:.2f})",
                flush=True,
            )
        infer = (
            inference_rows(
                name,
                {m: r[0].model for m, r in runs.items()},
                x,
                self.device,
                self.args.repeats,
                self.clock,
            )
            if self.args.inference
            else []
        )
        return rows, infer


def _load() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        bench = Bench(args)
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__,
            "device": str(bench.device),
            "device_name": _device_name(bench.device),
            "threads": torch.get_num_threads(),
            "amp": bench.amp,
            "channels_last": bench.channels_last,
            "compile": args.compile,
            "quant_kernel": args.quant_kernel,
            "clock": bench.clock,
            "image_size": bench.image_size,
            "repeats": args.repeats,
            "steps": args.steps,
            "warmup": args.warmup,
            "load_start": _load(),
        }
        training, inference = [], []
        for name in args.models:
            rows, infer = bench.model_rows(name)
            training += rows
            inference += infer
            # written after every model: a long run killed later (memory, deadline) keeps what it measured
            meta["load_end"] = _load()
            result = {"meta": meta, "training": training, "inference": inference}
            md, js = report.write(result, args.out, args.name or bench.device.type)
        print(f"wrote {md} and {js}")
        return 0
    except DGQuantError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
