"""User-facing errors: each carries a one-line message that names the fix."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from types import ModuleType


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


# optional package -> the dg-quant extra that installs it (pyproject.toml [project.optional-dependencies])
OPTIONAL_EXTRAS = {
    "open_clip": "clip",
    "transformers": "text",
    "matplotlib": "plots",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "torchao": "torchao",
    "submitit": "sweep",
    "tensorboard": "tensorboard",
    "wandb": "wandb",
}


def require_optional(module: str) -> ModuleType:
    """Import an optional dependency, or fail in one line naming the extra that installs it.

    Heavy libraries only some users need (CLIP, text encoders, plotting) are extras, so that
    installing dg-quant into an existing environment pulls in no more than it must.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != module.split(".")[0]:
            raise
        extra = OPTIONAL_EXTRAS.get(module.split(".")[0], "all")
        raise ConfigError(
            f"this needs the optional package {module.split('.')[0]!r}: pip install 'dg-quant[{extra}]'"
        ) from None


class OutputError(DGQuantError, OSError):
    """A result or checkpoint cannot be written (read-only folder, disk full, a folder in its place)."""


class TrainingError(DGQuantError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the last good checkpoint is kept."""


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
