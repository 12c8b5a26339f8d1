"""Gradient disorder (FQAT Definition 4.1; docs/methods.md 7.3) and the freezing rule, as pure functions.

For one scale factor and a window of K gradients g_1..g_K, the disorder is the fraction of
adjacent sign flips, D = (1/(K − 1))·Σ_u 1[sgn(g_u) ≠ sgn(g_{u−1})], element-wise. Random signs
give D ≈ 0.5; a persistent one-signed push gives D ≈ 0. Training keeps a running count instead of
the window (``Window`` + ``observe``), which gives the same number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

SIGNALS = ("task", "smooth", "task_vs_smooth")


def gradient_disorder(grads: Sequence[torch.Tensor], reduce: str = "mean") -> torch.Tensor:
    """D of a window of gradients of one scale factor (oldest first).

    :param reduce: ``mean`` averages over the elements (a per-channel s gives one number);
        ``per_element`` keeps one D per element.
    """
    if len(grads) < 2:
        raise ValueError(f"gradient disorder needs at least 2 gradients; got {len(grads)}")
    signs = torch.stack([torch.sign(g) for g in grads])
    flips = (signs[1:] != signs[:-1]).float().mean(dim=0)
    return reduce_disorder(flips, reduce)


def sign_disagreement(task: Sequence[torch.Tensor], flat: Sequence[torch.Tensor], reduce: str = "mean") -> torch.Tensor:
    """Fraction of steps where g_QAT and g_flat point opposite ways (the ``task_vs_smooth`` signal)."""
    signs_t = torch.stack([torch.sign(g) for g in task])
    signs_f = torch.stack([torch.sign(g) for g in flat])
    return reduce_disorder((signs_t != signs_f).float().mean(dim=0), reduce)


def reduce_disorder(per_element: torch.Tensor, reduce: str) -> torch.Tensor:
    if reduce == "mean":
        return per_element.mean()
    if reduce == "per_element":
        return per_element
    raise ValueError(f"reduce must be 'mean' or 'per_element'; got {reduce!r}")


@dataclass
class Window:
    """Running sign statistics of one scale factor since the window started."""

    previous: torch.Tensor | None = None  # sign of the last gradient seen
    events: torch.Tensor | None = None  # flips (or disagreements) per element
    pairs: int = 0  # how many comparisons ``events`` counts

    def state_dict(self) -> dict:
        return {"previous": self.previous, "events": self.events, "pairs": self.pairs}

    @classmethod
    def from_state(cls, state: dict) -> Window:
        return cls(state["previous"], state["events"], int(state["pairs"]))


def observe(window: Window, task: torch.Tensor | None, flat: torch.Tensor | None, signal: str) -> Window:
    """Add one step's gradients to ``window`` (returns it); missing gradients are skipped."""
    if signal == "task_vs_smooth":
        if task is None or flat is None:
            return window
        event = (torch.sign(task) != torch.sign(flat)).float()
        window.events = event if window.events is None else window.events + event
        window.pairs += 1
        return window
    grad = task if signal == "task" else flat
    if grad is None:
        return window
    sign = torch.sign(grad).detach()
    if window.previous is not None:
        flip = (sign != window.previous).float()
        window.events = flip if window.events is None else window.events + flip
        window.pairs += 1
    window.previous = sign
    return window


def _differs(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    """``(a != b).float()`` for lists of signs in {-1, 0, 1}, as multi-tensor ops: |a - b| clamped to 1."""
    diff = torch._foreach_sub(a, b)
    torch._foreach_abs_(diff)
    torch._foreach_clamp_max_(diff, 1.0)
    return diff


def observe_all(
    windows: list[Window], task: list[torch.Tensor | None], flat: list[torch.Tensor | None], signal: str
) -> None:
    """``observe`` for every scale factor of a step at once, in place; bit for bit the same counts.

    Runs a fixed handful of multi-tensor ops per step instead of about five ops per scale factor
    (each a GPU kernel launch); scale factors without the gradients it needs are skipped, as there.
    """
    if signal == "task_vs_smooth":
        idx = [i for i, (g, f) in enumerate(zip(task, flat)) if g is not None and f is not None]
        if not idx:
            return
        events = _differs(torch._foreach_sign([task[i] for i in idx]), torch._foreach_sign([flat[i] for i in idx]))
        _accumulate([windows[i] for i in idx], events)
        return
    grads = task if signal == "task" else flat
    idx = [i for i, g in enumerate(grads) if g is not None]
    if not idx:
        return
    signs = torch._foreach_sign([grads[i].detach() for i in idx])
    seen = [k for k, i in enumerate(idx) if windows[i].previous is not None]
    if seen:
        flips = _differs([signs[k] for k in seen], [windows[idx[k]].previous for k in seen])
        _accumulate([windows[idx[k]] for k in seen], flips)
    for k, i in enumerate(idx):
        windows[i].previous = signs[k]


def _accumulate(windows: list[Window], events: list[torch.Tensor]) -> None:
    """``window.events += event`` (the first event starts the count) and one more pair each."""
    events = list(events)
    counted = [k for k, w in enumerate(windows) if w.events is not None]
    if counted:  # out of place, as ``observe``: a state_dict taken earlier keeps its counts
        totals = torch._foreach_add([windows[k].events for k in counted], [events[k] for k in counted])
        for k, total in zip(counted, totals):
            events[k] = total
    for k, window in enumerate(windows):
        window.events = events[k]
        window.pairs += 1


def window_disorder(window: Window, reduce: str = "mean") -> torch.Tensor | None:
    """The window's D (None if it has no comparison yet, e.g. quantization was off)."""
    if window.events is None or window.pairs == 0:
        return None
    return reduce_disorder(window.events / window.pairs, reduce)


def freeze_mask(disorder: torch.Tensor, tau: float, freeze_if: str = "below_tau") -> torch.Tensor:
    """Which entries to freeze: D < τ (paper), or D ≥ τ for the ``above_tau`` ablation."""
    if freeze_if == "below_tau":
        return disorder < tau
    if freeze_if == "above_tau":
        return disorder >= tau
    raise ValueError(f"freeze_if must be 'below_tau' or 'above_tau'; got {freeze_if!r}")
