"""Quantizer-only timing: fake-quantize every conv/linear weight of a model, forward and backward.

    python benchmarks/kernels.py --models resnet18 resnet50

Compares the lsq-net autograd chain (grad-scale and round-STE detach tricks, what the public
reference code runs), the project's eager fused function and its compiled kernels, on the same
weights and steps, interleaved; prints a Markdown table (process CPU time on CPU).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import measure
from benchmarks.models import build
from dg_quant.quant import integer_bounds, lsq_fake_quant

QN, QP = integer_bounds(7, signed=True)


def lsqnet_chain(x: torch.Tensor, s: torch.Tensor, g: float) -> torch.Tensor:
    """lsq-net's order: grad-scale trick on s, divide, clamp, round with a detach STE, multiply."""
    s = (s - s * g).detach() + s * g
    v = torch.clamp(x / s, -QN, QP)
    return ((v.round() - v).detach() + v) * s


def _weights(name: str, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    model = build(name, 64, 1, device).model
    pairs = []
    for p in model.parameters():
        if p.dim() > 1:
            w = p.detach()
            s = (2 * w.reshape(w.shape[0], -1).abs().mean(1) / math.sqrt(QP)).reshape((-1,) + (1,) * (w.dim() - 1))
            pairs.append((w, s.clamp_min(1e-8)))
    return pairs


def _pass(pairs, kind: str) -> None:
    for w, s in pairs:
        x, st = w.clone().requires_grad_(), s.clone().requires_grad_()
        g = 1 / math.sqrt(QP * w.numel())
        out = (
            lsqnet_chain(x, st, g)
            if kind == "lsq-net chain"
            else lsq_fake_quant(x, st, QN, QP, g, 0.0, kind == "compiled")
        )
        out.backward(torch.ones_like(out))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = "wall" if device.type == "cuda" else "process"
    kinds = ("lsq-net chain", "eager", "compiled")
    print("| model | weights (M) | " + " | ".join(f"{k} ms" for k in kinds) + " | eager speed-up | compiled speed-up |")
    print("|---|---|" + "---|" * (len(kinds) + 2))
    for name in args.models:
        pairs = _weights(name, device)
        for kind in kinds:  # warm up (and compile)
            _pass(pairs, kind)
        fns = {k: functools.partial(_pass, pairs, k) for k in kinds}
        times = measure.interleaved_times(fns, args.repeats, 1, device, clock)
        ms = {k: measure.median(t) * 1e3 for k, t in times.items()}
        n = sum(w.numel() for w, _ in pairs) / 1e6
        ref = ms["lsq-net chain"]
        print(
            f"| {name} | {n:.1f} | "
            + " | ".join(f"{ms[k]:.1f}" for k in kinds)
            + f" | {ref / ms['eager']:.2f}x | {ref / ms['compiled']:.2f}x |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
