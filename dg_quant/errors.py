"""User-facing errors: each carries a one-line message that names the fix."""

from __future__ import annotations

import sys
from collections.abc import Callable


class DGQuantError(Exception):
    """Base of the errors a command line shows as one line instead of a traceback."""


class ConfigError(DGQuantError, ValueError):
    """A setting is out of range or inconsistent."""


class PluginError(DGQuantError, LookupError):
    """A plugin name cannot be resolved or loaded."""


class DataError(DGQuantError, FileNotFoundError):
    """A dataset folder or file is missing or malformed."""


class CheckpointError(DGQuantError, RuntimeError):
    """A checkpoint or exported model is missing, truncated or corrupt."""


def run_command(prog: str, body: Callable[[], object]) -> int:
    """Run a command-line tool's ``body``; a ``DGQuantError`` becomes one line on stderr.

    Returns the exit status: 0, or 2 for a user error (argparse's convention), so that no
    command prints a traceback for bad input.
    """
    try:
        body()
    except DGQuantError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0
