"""User-facing errors: each carries a one-line message that names the fix."""

from __future__ import annotations


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
