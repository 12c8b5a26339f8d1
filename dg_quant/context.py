"""What a host knows about a run beyond its settings: the typed ``context`` argument of the hooks.

``config`` holds the run's *settings* (parsed flags or DomainBed hparams) and is read-only for
everyone. Facts the host works out while setting the run up (how many steps it will take, how
long an epoch is, where its outputs go) travel in one frozen ``RunContext``, built once by the
host before ``dgq_configure`` and passed to every hook as ``context``, so that no plugin has to
guess them from attributes a host may or may not have set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# ``calibration(num_samples, batch_size)``: up to ``num_samples`` model inputs of the training
# split (source domains only) in batches, on the model's device, the same ones in the same order
# at every call. The argument ``calibration`` of ``dgq_train_end``.
Calibration = Callable[[int, int], Iterable["torch.Tensor | Any"]]


@dataclass(frozen=True)
class RunContext:
    """One run as its host set it up (every field None/empty when the host does not know it)."""

    host: str = "unknown"  # "wilds_run", "domainbed", or a script's own name
    dataset: str | None = None  # as the host names it ("pacs", "PACS"): per-dataset schedules key on it
    total_steps: int | None = None  # training steps of the whole run; None: the host cannot tell
    steps_per_epoch: int | None = None  # None where the host has no epochs (DomainBed)
    eval_every: int | None = None  # steps between evaluations
    log_dir: str | None = None  # the run's output folder; None: the host writes nothing for plugins
    plugins: tuple[str, ...] = ()  # the loaded plugins, by name, in load order
