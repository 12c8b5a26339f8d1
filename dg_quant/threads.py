"""How many CPU threads a run gives torch.

torch's own default is one thread per physical core, whatever else runs: on a shared machine
(several runs, or other users, on a few cores) the threads of every process then fight for the
same cores and a 20-second run takes minutes. The default here leaves the cores that are busy to
their owners: ``$OMP_NUM_THREADS`` when the user set it, else the CPUs this process may run on
(``os.sched_getaffinity``) minus the machine's one-minute load average, at least 1.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from dg_quant.errors import ConfigError


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a scheduler's allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_threads(environ: Mapping[str, str] | None = None) -> int:
    """``$OMP_NUM_THREADS`` if set to a positive integer, else the idle share of the available CPUs."""
    environ = os.environ if environ is None else environ
    try:
        given = int(environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        given = 0
    if given > 0:
        return given
    cpus = available_cpus()
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this system
        load = 0.0
    return max(1, min(cpus, math.floor(cpus - load + 0.5)))


def resolve_threads(requested: int | None) -> int:
    """``--threads``: the number asked for, or ``default_threads()`` when None."""
    if requested is None:
        return default_threads()
    if requested < 1:
        raise ConfigError(f"--threads must be at least 1; got {requested}")
    return requested


def apply_threads(requested: int | None) -> int:
    """Set torch's intra-op thread count as ``resolve_threads`` says; returns it."""
    import torch

    threads = resolve_threads(requested)
    torch.set_num_threads(threads)
    return threads
