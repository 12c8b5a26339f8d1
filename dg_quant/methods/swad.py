"""SWAD's loss-valley rule (Cha et al., NeurIPS 2021): which segment averages enter the final one.

Training is cut into segments, one per evaluation; each segment's weights are averaged every
step (``ParameterAverage``). Fed each segment's in-domain validation loss, ``LossValley`` applies
the rule of SWAD's ``LossValley``: the valley starts at segment c once c has the lowest loss of
the ``n_converge`` segments from c on (threshold = their mean loss x (1 + ``tolerance_ratio``));
the segments just before c that stayed under the threshold (at most ``n_tolerance - n_converge``)
join; after c, a segment joins once the ``n_tolerance`` segments from it on are known and not all
above the threshold, and the valley is dead (nothing joins any more) when they all are; at the
end, the segments still waiting join while the remaining ones are not all above the threshold.
The final weights are the uniform average of the chosen segment averages; if the valley never
started, the last segment's average. Defaults are SWAD's: 3, 6, 0.3.

Two quirks of the SWAD code are not reproduced (docs/composing.md): its final ``AveragedModel``
starts with a count of 0, so the first segment added overwrites the valley's first segment; and
before its tolerance queue is full it re-adds that queue's first segment at every evaluation.
Here every chosen segment counts exactly once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from dg_quant.errors import ConfigError
from dg_quant.methods.averaging import ParameterAverage


@dataclass
class Segment:
    """A segment's average weights and the validation loss measured at its end."""

    average: ParameterAverage
    loss: float
    index: int = -1  # position in feeding order, set by ``LossValley.update``


class LossValley:
    """SWAD's loss-valley rule over ``Segment``s; ``final()`` gives the averaged weights."""

    def __init__(self, n_converge: int = 3, n_tolerance: int = 6, tolerance_ratio: float = 0.3) -> None:
        if n_converge < 1 or n_tolerance < 1:
            raise ConfigError(f"--swad_n_converge and --swad_n_tolerance must be >= 1; got {n_converge}, {n_tolerance}")
        if tolerance_ratio < 0:
            raise ConfigError(f"--swad_tolerance_ratio must be >= 0; got {tolerance_ratio}")
        self.n_converge, self.n_tolerance, self.tolerance_ratio = n_converge, n_tolerance, tolerance_ratio
        # before the valley: the last segments (c and the candidates before it); after: those waiting
        self.recent: deque[Segment] = deque(maxlen=max(n_tolerance, n_converge) + n_converge)
        self.pending: list[Segment] = []
        self.average: ParameterAverage | None = None
        self.threshold: float | None = None
        self.dead_valley = False
        self.closed = False
        self.chosen: list[int] = []  # indices (0-based, in feeding order) of the segments averaged
        self.fed = 0

    @property
    def is_converged(self) -> bool:
        return self.average is not None

    def _add(self, segment: Segment, index: int) -> None:
        self.average.add_average(segment.average)
        self.chosen.append(index)

    def update(self, segment: Segment) -> None:
        """Feed the segment that just ended (its average and its end-of-segment validation loss)."""
        index, self.fed = self.fed, self.fed + 1
        if self.dead_valley or self.closed:
            return
        segment.index = index
        if not self.is_converged:
            self.recent.append(segment)
            self._detect_convergence()
            return
        self.pending.append(segment)
        while len(self.pending) >= self.n_tolerance:
            window = self.pending[: self.n_tolerance]
            if min(s.loss for s in window) > self.threshold:
                self.dead_valley = True
                return
            first = self.pending.pop(0)
            self._add(first, first.index)

    def _detect_convergence(self) -> None:
        if len(self.recent) < self.n_converge:
            return
        window = list(self.recent)[-self.n_converge :]
        losses = [s.loss for s in window]
        if min(range(len(losses)), key=losses.__getitem__) != 0:
            return
        self.threshold = sum(losses) / len(losses) * (1.0 + self.tolerance_ratio)
        self.average = ParameterAverage()
        n_before = self.n_tolerance - self.n_converge
        before = list(self.recent)[: -self.n_converge][-n_before:] if n_before > 0 else []
        joined = []
        for segment in reversed(before):
            if segment.loss > self.threshold:
                break
            joined.insert(0, segment)
        for segment in joined + [window[0]]:
            self._add(segment, segment.index)
        self.pending = window[1:]
        self.recent.clear()
        # the segments after c wait for their tolerance windows
        while len(self.pending) >= self.n_tolerance and not self.dead_valley:
            if min(s.loss for s in self.pending[: self.n_tolerance]) > self.threshold:
                self.dead_valley = True
                break
            first = self.pending.pop(0)
            self._add(first, first.index)

    def final(self) -> ParameterAverage | None:
        """The final average; before the valley started, the last segment's (None if none was fed)."""
        if not self.is_converged:
            return self.recent[-1].average if self.recent else None
        if not self.dead_valley and not self.closed:
            while self.pending and min(s.loss for s in self.pending) <= self.threshold:
                first = self.pending.pop(0)
                self._add(first, first.index)
            self.pending = []
        self.closed = True
        return self.average

    def state_dict(self) -> dict[str, Any]:
        def segment_state(s: Segment) -> dict[str, Any]:
            return {"average": s.average.state_dict(), "loss": s.loss, "index": s.index}

        return {
            "recent": [segment_state(s) for s in self.recent],
            "pending": [segment_state(s) for s in self.pending],
            "average": self.average.state_dict() if self.average is not None else None,
            "threshold": self.threshold,
            "dead_valley": self.dead_valley,
            "closed": self.closed,
            "chosen": list(self.chosen),
            "fed": self.fed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def segment(s: dict[str, Any]) -> Segment:
            average = ParameterAverage()
            average.load_state_dict(s["average"])
            return Segment(average, float(s["loss"]), int(s["index"]))

        self.recent = deque((segment(s) for s in state["recent"]), maxlen=self.recent.maxlen)
        self.pending = [segment(s) for s in state["pending"]]
        self.average = None
        if state["average"] is not None:
            self.average = ParameterAverage()
            self.average.load_state_dict(state["average"])
        self.threshold, self.dead_valley = state["threshold"], bool(state["dead_valley"])
        self.closed, self.chosen, self.fed = bool(state["closed"]), list(state["chosen"]), int(state["fed"])
