"""Progress bars that suit both a terminal and a redirected log.

On a terminal tqdm redraws ten times a second. Into a file (``wilds_run ... 2> log``, a scheduler's
log) every redraw is another ``\\r`` frame, so a long run would fill the log with kilobytes of
frames; there the bar redraws at most every ``LOG_INTERVAL_S`` seconds (and once at the end).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 60.0


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or foreign stream
        return False


def progress_bar(
    total: int | None, desc: str, unit: str, *, disable: bool = False, stream: TextIO | None = None, **kwargs: Any
) -> tqdm:
    """A tqdm bar on ``stream`` (stderr), throttled to one redraw a minute when it is not a terminal."""
    stream = stream if stream is not None else sys.stderr
    terminal = _is_terminal(stream)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=disable,
        file=stream,
        dynamic_ncols=terminal,
        mininterval=0.1 if terminal else LOG_INTERVAL_S,
        **kwargs,
    )
