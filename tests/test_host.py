"""Plugin resolution and loading, like pytest's ``-p``."""

from __future__ import annotations

import importlib.metadata
import sys
import types

import pytest

from dg_quant import hookimpl
from dg_quant.errors import PluginError
from dg_quant.host import BUILTIN_PLUGINS, PluginHost, known_plugins, resolve_plugin


def test_builtin_names_resolve_to_their_modules() -> None:
    plugin = resolve_plugin("dg_quant.qtdog")
    assert plugin.__name__ == BUILTIN_PLUGINS["dg_quant.qtdog"]


def test_import_paths_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("my_dgq_plugin")
    monkeypatch.setitem(sys.modules, "my_dgq_plugin", module)
    assert resolve_plugin("my_dgq_plugin") is module


def test_entry_points_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("third_party_plugin_impl")
    monkeypatch.setitem(sys.modules, "third_party_plugin_impl", module)
    ep = importlib.metadata.EntryPoint("thirdparty", "third_party_plugin_impl", "dg_quant")
    monkeypatch.setattr("dg_quant.host._entry_points", lambda: {"thirdparty": ep})
    assert resolve_plugin("thirdparty") is module
    assert "thirdparty" in known_plugins()


def test_unknown_plugin_is_a_one_line_error_listing_known_names() -> None:
    with pytest.raises(PluginError) as info:
        resolve_plugin("dg_quant.nope")
    message = str(info.value)
    assert "\n" not in message
    assert "dg_quant.qtdog" in message and "unknown plugin 'dg_quant.nope'" in message


def test_plugin_failing_inside_its_import_is_reported_as_such(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    (tmp_path / "broken_dgq_plugin.py").write_text("import a_module_that_does_not_exist_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="failed to import"):
        resolve_plugin("broken_dgq_plugin")


def test_host_loads_each_plugin_once_and_blocks_with_no_prefix() -> None:
    host = PluginHost(["no:dg_quant.qtdog", "dg_quant.qtdog", "dg_quant.lsq", "dg_quant.lsq"])
    assert host.names == ["dg_quant.lsq"]


def test_hosts_are_independent() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.steps: list[int] = []

        @hookimpl
        def dgq_step_start(self, step: int) -> None:
            self.steps.append(step)

    a, b = PluginHost(), PluginHost()
    rec = Recorder()
    a.register(rec)
    a.hook.dgq_step_start(model=None, optimizer=None, step=3, config=None, context=a.context)
    b.hook.dgq_step_start(model=None, optimizer=None, step=4, config=None, context=b.context)
    assert rec.steps == [3]


def test_plugin_with_an_unknown_hook_name_is_rejected() -> None:
    class Bad:
        @hookimpl
        def dgq_not_a_hook(self) -> None:
            pass

    host = PluginHost()
    with pytest.raises(Exception, match="dgq_not_a_hook"):
        host.register(Bad())
