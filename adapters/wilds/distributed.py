"""Data-parallel ``wilds_run`` under ``torchrun``: one process per device, gradients averaged by DDP.

``torchrun --nproc_per_node N wilds_run ...`` (or ``python -m torch.distributed.run``) sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; without them a run is one process and nothing here acts.
The run is the one-process run with the same flags, split over processes:

- ``--batch_size`` is the *global* batch. Every process draws the same global batch (the data order
  is a function of (seed, epoch), and the RNG follows rank 0) and keeps every N-th example of it,
  so WILDS' group sampler and ``--n_groups_per_batch`` describe the global batch as before.
- Every backward pass goes through ``DistributedDataParallel``, which averages the gradients; the
  two-pass steps (SAGM, FQAT) therefore perturb with the global gradient and route global g/g'.
- Activation quantizers initialise their step on their first batch: that batch is gathered from
  every process, so the step is the one a single process would compute from the global batch.
- Parameters, buffers, optimizer and plugin state (FQAT masks and windows, INQ partitions, EWGS
  δ) are then identical on every process; ``check_in_step`` compares their fingerprints at every
  evaluation and stops the run if they drifted apart.
- Rank 0 holds the run folder's lock, evaluates (alone, on the whole split) and writes every file.

BatchNorm normalises with each process's share of the batch (as in any DDP run without
SyncBatchNorm); models without BatchNorm train as the one-process run does, within float tolerance.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dg_quant.errors import ConfigError, TrainingError
from dg_quant.loop import scalar_metrics
from dg_quant.quant import iter_quantizers

# Rank 0 evaluates alone while the others wait at the next collective: leave it time for a large
# validation split (torch's default is 10 minutes for NCCL).
WAIT_FOR_RANK0 = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Processes:
    """Where this process stands among the run's processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1


def from_environment(environ: Mapping[str, str] | None = None) -> Processes:
    """The process layout torchrun announces in the environment; one process without it."""
    environ = os.environ if environ is None else environ
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; start the run with torchrun") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK {rank} is not within WORLD_SIZE {world}; start the run with torchrun")
    return Processes(rank, world, local)


def local_device(device: torch.device, procs: Processes) -> torch.device:
    """This process's device: ``cuda`` means ``cuda:LOCAL_RANK`` when there are several processes."""
    if not procs.parallel or device.type != "cuda":
        return device
    index = procs.local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK {procs.local_rank} has no GPU (this machine has {torch.cuda.device_count()}); "
            "lower --nproc_per_node"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


@contextlib.contextmanager
def process_group(procs: Processes, device: torch.device) -> Iterator[None]:
    """The default process group for the run (NCCL on GPUs, gloo on the CPU), torn down afterwards."""
    if not procs.parallel:
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=WAIT_FOR_RANK0)
    try:
        yield
    finally:
        dist.destroy_process_group()


def check_batch_size(batch_size: int, procs: Processes) -> None:
    """The global batch is dealt out evenly, so that averaging per-process means is the global mean."""
    if batch_size % procs.world_size:
        raise ConfigError(
            f"--batch_size {batch_size} (the global batch) does not divide among {procs.world_size} processes; "
            f"use a multiple of {procs.world_size}"
        )


class RankSlice:
    """A batch sampler that keeps this process's share (every N-th index) of each global batch."""

    def __init__(self, batches: Any, procs: Processes) -> None:
        self.batches, self.procs = batches, procs

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield list(batch)[self.procs.rank :: self.procs.world_size]

    def __len__(self) -> int:
        return len(self.batches)


def shard_loader(loader: torch.utils.data.DataLoader, procs: Processes) -> torch.utils.data.DataLoader:
    """``loader`` (a WILDS training loader) with each global batch cut down to this process's share.

    The new loader iterates its batch sampler exactly as ``loader`` would, so every process draws
    the same random numbers and sees the same sequence of global batches.
    """
    if not procs.parallel:
        return loader
    return torch.utils.data.DataLoader(
        loader.dataset,
        batch_sampler=RankSlice(loader.batch_sampler, procs),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )


def data_parallel(model: nn.Module, procs: Processes, device: torch.device) -> nn.Module:
    """The module the gradient passes run through: ``model`` itself, or DDP around it.

    ``find_unused_parameters``: quantizer steps get gradients only once quantization is on, and
    the released QT-DoG behaviour stops training some parameters mid-run.
    """
    if not procs.parallel:
        return model
    _global_activation_init(model, procs)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def _global_activation_init(model: nn.Module, procs: Processes) -> None:
    """Initialise an activation quantizer's step from the whole global batch, as one process would.

    Its first batch is gathered from every process (once per quantizer), so the LSQ and MSE rules
    see what the one-process run sees; rank 0's result is then broadcast, bit for bit.
    """

    def initialise(quantizer: nn.Module, args: tuple) -> None:
        # training steps only: every process runs them (rank 0 alone may run no-grad passes)
        if quantizer.enabled and not quantizer.initialized and quantizer.training and torch.is_grad_enabled():
            x = args[0].detach().contiguous()
            shares = [torch.empty_like(x) for _ in range(procs.world_size)]
            dist.all_gather(shares, x)
            # rank r holds examples r, r + N, ... of the global batch: interleave them back into its order
            quantizer.initialize(torch.stack(shares, dim=1).reshape(-1, *x.shape[1:]))
            dist.broadcast(quantizer.step.data, src=0)

    for _, quantizer in iter_quantizers(model):
        if not quantizer.is_weight:  # weight steps come from the weights, equal everywhere
            quantizer.register_forward_pre_hook(initialise)


def any_rank(flag: bool, procs: Processes, device: torch.device) -> bool:
    """True on every process if ``flag`` is true on any (a stop request seen by one process)."""
    if not procs.parallel:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def share_torch_rng(procs: Processes, device: torch.device) -> None:
    """Every process continues with rank 0's torch RNG (a plugin may draw a data-dependent number
    of random numbers, e.g. EWGS's Hutchinson trace estimate, and the data order draws from it)."""
    if not procs.parallel:
        return
    state = torch.get_rng_state().to(device)
    dist.broadcast(state, src=0)
    torch.set_rng_state(state.cpu())


def follow_rank0_buffers(model: nn.Module, procs: Processes) -> None:
    """Rank 0's BatchNorm running statistics on every process, as DDP sets them at every forward
    (each process updated them from its own share of the last batch)."""
    if not procs.parallel:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.broadcast(buffer, src=0)


def follow_rank0(state: Any, procs: Processes) -> Any:
    """Rank 0's ``state`` on every process (the RNG after rank 0 alone evaluated)."""
    if not procs.parallel:
        return state
    box = [state]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_in_step(parts: Mapping[str, Any], procs: Processes, step: int) -> None:
    """TrainingError on every process if any part of the training state differs between processes."""
    if not procs.parallel:
        return
    mine = {name: fingerprint(value) for name, value in parts.items()}
    everyone: list[Any] = [None] * procs.world_size
    dist.all_gather_object(everyone, mine)
    differ = [name for name in mine if any(other[name] != mine[name] for other in everyone)]
    if differ:
        raise TrainingError(
            f"step {step}: the processes hold different {', '.join(differ)} (a plugin changed state from what "
            "one process alone saw); train with one process, or make the plugin average or broadcast that state"
        )


def fingerprint(value: Any) -> str:
    """A digest of nested dicts/lists of tensors and plain values (device and layout ignored)."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        digest.update(f"A{value.dtype}{value.shape}".encode() + np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Mapping):
        digest.update(b"{")
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode())
            _feed(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, list | tuple):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    else:
        digest.update(repr(value).encode())


def average_metrics(window: list[dict[str, Any]], procs: Processes, device: torch.device) -> list[dict[str, float]]:
    """Each step's metrics averaged over the processes (each measured its share of the global batch)."""
    if not procs.parallel or not window:
        return window
    rows = [scalar_metrics(m) for m in window]
    keys = sorted({k for row in rows for k in row})
    table = torch.tensor([[row.get(k, math.nan) for k in keys] for row in rows], dtype=torch.float64, device=device)
    dist.all_reduce(table)
    table /= procs.world_size
    return [
        {k: v for k, v, present in zip(keys, values, row_keys) if present}
        for values, row_keys in zip(table.tolist(), ([k in row for k in keys] for row in rows))
    ]
