"""Timing and memory measurements that work the same on CPU and CUDA."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on request; ``none`` runs in float32."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}


def seconds_per_call(fn: Callable[[], object], calls: int, device: torch.device, clock: str = "wall") -> float:
    """Time of ``calls`` calls of ``fn`` divided by ``calls`` (device work included).

    ``process`` counts the CPU time of this process only: on a CPU shared with other jobs it
    ignores the time the scheduler gives them, which wall time does not.
    """
    now = CLOCKS[clock]
    synchronize(device)
    start = now()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (now() - start) / calls


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    calls: int,
    device: torch.device,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Time every function once per repeat, in rotating order, so load changes hit all alike."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(seconds_per_call(fns[name], calls, device, clock))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


@contextlib.contextmanager
def saved_tensor_bytes() -> Iterator[list[int]]:
    """Count the distinct storages autograd saves for backward inside the block (weights too)."""
    seen: dict[tuple[int, torch.device], int] = {}
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key not in seen:
            seen[key] = storage.nbytes()
            total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def forward_saved_mb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, amp_ctx) -> float:
    """MB that one training forward keeps alive for its backward (activation memory)."""
    model.train()
    with saved_tensor_bytes() as total, amp_ctx:
        loss = loss_fn(model(x), y)
    del loss
    return total[0] / 2**20


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operators that do work (views and aliases excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def aten_ops(fn: Callable[[], object]) -> int:
    """ATen operators one call of ``fn`` dispatches, views excluded (a ``_foreach_*`` op is one).

    On a GPU nearly each one is a kernel launch with a few microseconds of CPU cost, so this is
    the launch overhead a step carries, measurable on any device (not meaningful for a compiled
    model, whose fused kernels dispatch differently: the harness leaves it out there).
    """
    counter = _OpCounter()
    with counter:
        fn()
    return counter.count


def cuda_peak_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak allocated CUDA memory during ``fn``; None on CPU (no allocator statistics there)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def parameter_mb(model: nn.Module) -> float:
    """Size of the model's float parameters and buffers as stored."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20
