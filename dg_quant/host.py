"""The plugin host: resolves ``--plugin NAME``, loads plugins and exposes the hooks.

Name resolution follows pytest's ``-p``: a bundled name, then an entry point in the group
``dg_quant``, then an importable module path. Method plugins are never auto-loaded: a run is
ERM unless it names a plugin. Two plugins that own the same part of a run (``DGQ_OWNS``, see
``dg_quant.ownership``) are refused when the second is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import os
import sys
from collections.abc import Iterable
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

import pluggy

from dg_quant import defaults, hookspecs
from dg_quant.context import RunContext
from dg_quant.errors import PluginError
from dg_quant.ownership import check_owners

PROJECT = "dg_quant"
ENTRY_POINT_GROUP = "dg_quant"
TRACE_ENV = "DG_QUANT_TRACE_PLUGINS"

# Bundled plugins by name -> module. The core knows them only as strings.
BUILTIN_PLUGINS: dict[str, str] = {
    "dg_quant.qtdog": "dg_quant.plugins.qtdog",
    "dg_quant.lsq": "dg_quant.plugins.lsq",
    "dg_quant.sagm": "dg_quant.plugins.sagm",
    "dg_quant.fqat": "dg_quant.plugins.fqat",
    "dg_quant.inq": "dg_quant.plugins.inq",
    "dg_quant.obc": "dg_quant.plugins.obc",
    "dg_quant.coral": "dg_quant.plugins.coral",
    "dg_quant.mixstyle": "dg_quant.plugins.mixstyle",
    "dg_quant.sam": "dg_quant.plugins.sam",
    "dg_quant.swa": "dg_quant.plugins.swa",
    "dg_quant.swad": "dg_quant.plugins.swad",
}


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def known_plugins() -> list[str]:
    """Names ``--plugin`` accepts without an import path."""
    return sorted(set(BUILTIN_PLUGINS) | set(_entry_points()))


def resolve_plugin(name: str) -> ModuleType | Any:
    """Import the plugin called ``name``, or raise a one-line ``PluginError``."""
    if name in BUILTIN_PLUGINS:
        return importlib.import_module(BUILTIN_PLUGINS[name])
    eps = _entry_points()
    if name in eps:
        return eps[name].load()
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            raise PluginError(
                f"unknown plugin {name!r}; known plugins: {', '.join(known_plugins())} "
                "(or give an importable module path)"
            ) from None
        raise PluginError(f"plugin {name!r} failed to import: {exc}") from exc


@runtime_checkable
class Stateful(Protocol):
    """A per-run plugin object whose state travels in the run's checkpoint.

    torch's ``state_dict`` protocol rather than a hook: the host keeps such objects by the name
    they were registered under, which keys their entry in ``last.pt`` (WILDS) and ``model.pkl``
    (DomainBed), so the state cannot drift from the weights it belongs to. Return tensors, dicts,
    lists, str, int, float, bool and None only (DomainBed reloads with ``weights_only=True``);
    ``None`` stores nothing.
    """

    def state_dict(self) -> dict[str, Any] | None: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PluginHost:
    """One run's plugin manager with a typed facade (``host.hook.dgq_*``).

    Each host is independent: two runs in one process do not share plugin state.
    """

    def __init__(self, plugins: Iterable[str] = ()) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.pm.register(defaults, name="dg_quant.defaults")
        self.names: list[str] = []
        self.stateful: dict[str, Stateful] = {}  # registered name -> object, in registration order
        self.context = RunContext()  # the run's, once configure() is called
        if os.environ.get(TRACE_ENV):
            self.pm.trace.root.setwriter(sys.stderr.write)
            self.pm.enable_tracing()
        for name in plugins:
            self.load(name)

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def load(self, name: str) -> None:
        """Load plugin ``name`` (idempotent); ``no:NAME`` blocks it instead."""
        if name.startswith("no:"):
            self.pm.set_blocked(name[3:])
            return
        if name in self.names or self.pm.is_blocked(name):
            return
        plugin = resolve_plugin(name)
        check_owners({n: self.pm.get_plugin(n) for n in self.names}, name, plugin)  # e.g. two quantizers
        self.pm.register(plugin, name=name)
        self.pm.check_pending()
        self.names.append(name)

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register a per-run plugin object; a ``Stateful`` one needs a ``name`` that is the same
        in every run, since it keys the object's state in checkpoints."""
        if isinstance(plugin, Stateful):
            if name is None:
                raise PluginError(
                    f"{type(plugin).__name__} has state_dict/load_state_dict but was registered without a name; "
                    "register it with host.register(obj, name='<plugin>.<part>') so checkpoints can find it"
                )
            self.stateful[name] = plugin
        self.pm.register(plugin, name=name)
        self.pm.check_pending()

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        self.hook.dgq_add_options.call_historic(kwargs={"parser": parser})

    def configure(self, config: argparse.Namespace, context: RunContext | None = None) -> RunContext:
        """Start the run: every plugin's ``dgq_configure`` with the read-only ``config`` and the
        host's ``context`` (kept as ``self.context``; its ``plugins`` are this host's loaded names).
        A host that knows nothing about the run (a script, a test) may leave ``context`` out."""
        context = context or RunContext()
        if context.plugins != tuple(self.names):
            context = dataclasses.replace(context, plugins=tuple(self.names))
        self.context = context
        self.hook.dgq_configure.call_historic(kwargs={"config": config, "host": self, "context": context})
        return context
