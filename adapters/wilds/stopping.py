"""Stopping a run cleanly: SIGTERM (what schedulers send before SIGKILL) and a non-finite loss.

On SIGTERM ``wilds_run`` finishes the current training step, saves ``last.pt`` and exits with
status 143 and the command that resumes the run; a SIGTERM during an evaluation stops it at once
and saves the state from before that evaluation, which a resumed run evaluates first.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from dg_quant.errors import TrainingError


class Terminated(BaseException):
    """The run was asked to stop (SIGTERM) and saved its checkpoint.

    A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` swallows it.
    """

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped by SIGTERM at step {step}")
        self.step = step


class StopRequest:
    """Set by SIGTERM; the training loop polls ``requested`` after each step.

    While ``interruptible`` is on (during an evaluation) the signal raises ``Terminated`` at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self.interruptible = False
        self.step = 0

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
        if self.interruptible:
            self.interruptible = False
            raise Terminated(self.step)

    @contextlib.contextmanager
    def interrupting(self, step: int) -> Iterator[None]:
        """Within this block a SIGTERM raises ``Terminated`` immediately."""
        self.step, self.interruptible = step, True
        try:
            if self.requested:
                raise Terminated(step)
            yield
        finally:
            self.interruptible = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle SIGTERM while the block runs (only possible in the main thread; else a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)


def check_finite(window: Sequence[dict], model: nn.Module, first_step: int) -> None:
    """TrainingError if a step's ``loss`` in ``window`` or a model parameter is NaN or infinite.

    One device sync for the whole window, so a GPU run is not slowed step by step.
    """
    losses = [m["loss"] for m in window if isinstance(m.get("loss"), torch.Tensor)]
    if losses:
        finite = torch.isfinite(torch.stack([loss.detach().float().reshape(()) for loss in losses]))
        if not bool(finite.all()):
            bad = first_step + int((~finite).nonzero()[0])
            raise TrainingError(f"the training loss became non-finite (NaN or inf) at step {bad}")
    params = [p.detach() for p in model.parameters()]
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        raise TrainingError(f"the model's weights became non-finite (NaN or inf) by step {first_step + len(window)}")
