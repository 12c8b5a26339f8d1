"""``wilds_run --config FILE``: a run's settings from a YAML (or JSON) file; flags on the command line win.

The keys are the flags' names (``lr``, ``n_steps``, ``plugin``, a plugin's ``bits``;
``channels-last`` and ``channels_last`` both work). A run's own ``config.json`` is a valid file, so
``wilds_run --config runs/x/config.json --log_dir runs/x_again`` repeats a run. The file's values
become flags placed *before* the command line's, so argparse checks their types and choices as
if typed, and a flag given again on the command line overrides the file (``--plugin`` adds to it).
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from dg_quant.errors import ConfigError

# Keys a run writes into config.json that are computed, not set (recomputed on re-run), and
# ``config``, the file a run was read from.
DERIVED_KEYS = frozenset({"plugins", "total_steps", "steps_per_epoch", "config"})
NOT_IN_FILE = frozenset({"help"})


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The file's mapping with keys normalised to flag destinations (``-`` -> ``_``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--config {path}: not valid YAML{line}: {problem}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings (key: value), got {type(values).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    if "plugin" not in values and "plugins" in values:  # a hand-written file may say `plugins:`
        values["plugin"] = values.pop("plugins")
    return values


def file_plugins(values: dict[str, Any]) -> list[str]:
    """The plugins a config file loads (they must be loaded before their options are parsed)."""
    plugins = values.get("plugin") or []
    return [plugins] if isinstance(plugins, str) else [str(p) for p in plugins]


def config_argv(values: dict[str, Any], parser: argparse.ArgumentParser, source: str | Path) -> list[str]:
    """The flags that say what ``values`` says; an unknown key is a one-line ``ConfigError``."""
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    argv: list[str] = []
    for key, value in values.items():
        if key in DERIVED_KEYS:
            continue
        action = actions.get(key)
        if action is None or key in NOT_IN_FILE:
            raise ConfigError(_unknown(key, actions, source))
        argv += _flags(action, value, source)
    return argv


def _unknown(key: str, actions: dict[str, argparse.Action], source: str | Path) -> str:
    known = [k for k in actions if k not in NOT_IN_FILE]
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"did you mean {' or '.join(close)}?" if close else "see wilds_run --help for the settings"
    return (
        f"{source}: unknown key {key!r}; {hint} "
        "(a plugin's options are known once the file or --plugin loads that plugin)"
    )


def _flags(action: argparse.Action, value: Any, source: str | Path) -> list[str]:
    """One setting as command-line tokens, for the kind of flag ``action`` is."""
    long = [o for o in action.option_strings if o.startswith("--")] or action.option_strings
    opt = long[0]  # --group_logging, not its --no-group_logging
    if isinstance(action, argparse.BooleanOptionalAction):
        if value is None:
            return []
        _expect_bool(action.dest, value, source)
        return [opt] if value else [f"--no-{opt[2:]}"]
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        _expect_bool(action.dest, value, source)
        return [opt] if value != action.default else []
    if value is None:
        return []  # unset: the default (or the dataset preset) applies
    if isinstance(action, argparse._AppendAction):
        return [token for v in _as_list(value) for token in (opt, _text(v))]
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        values = list(_as_list(value))
        return [opt, *(_text(v) for v in values)] if values else []  # []: the default
    if isinstance(value, list | dict):
        raise ConfigError(f"{source}: {action.dest} takes one value, got {value!r}")
    return [opt, _text(value)]


def _expect_bool(key: str, value: Any, source: str | Path) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: {key} is true or false, got {value!r}")


def _as_list(value: Any) -> Iterable[Any]:
    return value if isinstance(value, list | tuple) else [value]


def _text(value: Any) -> str:
    """A YAML value as the command line would spell it (booleans as true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
