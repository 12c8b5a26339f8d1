"""Where a training step's time goes: torch.profiler over one step per method, built as bench.py builds them.

    python benchmarks/profile_step.py --models deit_tiny mobilenet_v2 --plugins erm qtdog fqat --image-size 224

Prints, per model and method, the operators with the most self CPU time (and their call counts), then
each method's difference to ERM operator by operator (``--diff``), so that a method's extra cost can be
read from the profile instead of guessed. The large matmuls/convolutions are the same work in every
method; their time varies with the load, so read the differences of the other operators first.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench import Bench, parse_args
from benchmarks.models import build


def _profile_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, argparse.Namespace]:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--top", type=int, default=25, help="operators listed per method")
    p.add_argument("--profiled-steps", type=int, default=1)
    p.add_argument("--diff", type=int, default=25, help="operators listed in the difference to ERM")
    own, rest = p.parse_known_args(argv)
    return parse_args([*rest, "--no-inference", "--no-ops"]), own


def _self_ms(prof: profile, steps: int) -> dict[str, tuple[float, int]]:
    """Operator name -> (self CPU ms per step, calls per step)."""
    return {e.key: (e.self_cpu_time_total / 1e3 / steps, e.count // steps) for e in prof.key_averages()}


def _print_diff(name: str, label: str, ops: dict[str, tuple[float, int]], erm: dict, rows: int) -> None:
    keys = set(ops) | set(erm)
    diff = sorted(keys, key=lambda k: -abs(ops.get(k, (0, 0))[0] - erm.get(k, (0, 0))[0]))
    total = sum(v[0] for v in ops.values()) - sum(v[0] for v in erm.values())
    print(f"--- {name} {label} minus erm: {total:+.0f} ms/step; largest differences (ms, calls):")
    for k in diff[:rows]:
        (ms, n), (ms0, n0) = ops.get(k, (0.0, 0)), erm.get(k, (0.0, 0))
        print(f"  {ms - ms0:+9.1f}  {ms:9.1f} vs {ms0:9.1f}  calls {n:5d} vs {n0:5d}  {k[:70]}")


def main(argv: Sequence[str] | None = None) -> int:
    args, own = _profile_args(argv)
    top, steps = own.top, own.profiled_steps
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args)
    for name in args.models:
        torch.manual_seed(0)
        work = build(name, bench.image_size, args.batch_size, bench.device)
        x = torch.randn(work.batch_size, *work.input_shape, device=bench.device)
        y = torch.randint(0, 7, (work.batch_size,), device=bench.device)
        erm: dict[str, tuple[float, int]] = {}
        for method in args.plugins:
            trainer, built, step = bench._warm(work, method, (x, y))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    step()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48)
            total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3 / steps
            print(f"\n===== {name} (batch {work.batch_size}, {bench.image_size} px) {built.label}: {total:.0f} ms/step")
            if top:
                print(table, flush=True)
            ops = _self_ms(prof, steps)
            if method == "erm":
                erm = ops
            elif own.diff:
                _print_diff(name, built.label, ops, erm, own.diff)
            del trainer, step
    return 0


if __name__ == "__main__":
    sys.exit(main())
