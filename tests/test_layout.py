"""Tripwires for the three-room layout (README, "Files"): ``plugins/`` and ``adapters/`` import the
``dg_quant`` core, the core imports neither, and a host reaches a method only through the hooks."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import dg_quant
from dg_quant.host import BUILTIN_PLUGINS, PluginHost

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "dg_quant"


ROOMS = {"dg_quant": CORE, "dg_quant.plugins": ROOT / "plugins", "dg_quant.adapters": ROOT / "adapters"}
# The base every layer may use, itself importing nothing else of the core.
BASE = ("dg_quant.errors", "dg_quant.io")


def module_name(path: Path) -> str:
    """The installed name of a repository file (``plugins/obc.py`` -> ``dg_quant.plugins.obc``)."""
    for prefix, folder in sorted(ROOMS.items(), key=lambda item: -len(str(item[1]))):
        if path.is_relative_to(folder):
            parts = path.relative_to(folder).with_suffix("").parts
            return ".".join((prefix, *parts[: -1 if parts[-1] == "__init__" else None]))
    raise AssertionError(f"{path} is in no room")


def imported_modules(path: Path) -> set[str]:
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    return scan_imports(path.read_text(), package)


def scan_imports(source: str, package: str) -> set[str]:
    """Every module ``source`` (a module of ``package``) imports anywhere, also inside functions.

    Relative imports are resolved; ``from a import b`` counts as ``a`` and ``a.b`` (b may be a
    module); ``importlib.import_module("literal")`` counts too.
    """
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names if a.name != "*"}
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return names


def within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def offenders(files: list[Path], bad: Callable[[str], bool]) -> dict[str, list[str]]:
    found = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if bad(m)) for p in files}
    return {path: mods for path, mods in found.items() if mods}


def py_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def test_the_import_scan_sees_nested_relative_and_dynamic_imports() -> None:
    """The guards below are only as good as the scan: it must see what a top-level grep misses."""
    source = (
        "import importlib\n"
        "def f():\n    from dg_quant.plugins import obc\n"
        "def g():\n    from ..domainbed import launcher\n"
        "def h():\n    return importlib.import_module('dg_quant.plugins.inq')\n"
    )
    seen = scan_imports(source, "dg_quant.adapters.wilds")
    assert {"dg_quant.plugins.obc", "dg_quant.adapters.domainbed.launcher", "dg_quant.plugins.inq"} <= seen
    assert module_name(ROOT / "plugins" / "fqat" / "__init__.py") == "dg_quant.plugins.fqat"
    assert module_name(ROOT / "adapters" / "wilds" / "ptq.py") == "dg_quant.adapters.wilds.ptq"


def test_core_imports_neither_plugins_nor_adapters() -> None:
    bad = offenders(py_files(CORE), lambda m: within(m, "dg_quant.plugins", "dg_quant.adapters", "plugins", "adapters"))
    assert bad == {}


def test_the_base_imports_nothing_else_of_the_core() -> None:
    files = [CORE / f"{name.rpartition('.')[2]}.py" for name in BASE]
    assert offenders(files, lambda m: within(m, "dg_quant") and not within(m, *BASE)) == {}


def test_quantizers_are_a_leaf_importing_only_the_base() -> None:
    bad = offenders(
        py_files(CORE / "quant"), lambda m: within(m, "dg_quant") and not within(m, "dg_quant.quant", *BASE)
    )
    assert bad == {}


def test_deploy_imports_only_the_quantizers_and_the_base() -> None:
    allowed = ("dg_quant.deploy", "dg_quant.quant", *BASE)
    assert offenders(py_files(CORE / "deploy"), lambda m: within(m, "dg_quant") and not within(m, *allowed)) == {}


def test_adapters_never_import_plugins() -> None:
    assert offenders(py_files(ROOT / "adapters"), lambda m: within(m, "dg_quant.plugins", "plugins")) == {}


def test_plugins_are_reached_only_through_the_hooks() -> None:
    """Only plugins import plugins; the core names bundled ones as strings in ``BUILTIN_PLUGINS`` alone,
    and each of those registers ``dgq_*`` hook implementations."""
    assert offenders(py_files(CORE), lambda m: within(m, "dg_quant.plugins", "plugins")) == {}  # adapters: above
    core = [p for p in py_files(CORE) if "dg_quant.plugins" in p.read_text()]
    assert [str(p.relative_to(ROOT)) for p in core] == ["dg_quant/host.py"]
    for name in BUILTIN_PLUGINS:
        host = PluginHost([name])
        impls = [i for caller in host.pm.get_hookcallers(host.pm.get_plugin(name)) for i in caller.get_hookimpls()]
        assert impls and all(i.function.__name__.startswith("dgq_") for i in impls), name


def test_the_two_hosts_do_not_import_each_other() -> None:
    wilds, domainbed = "dg_quant.adapters.wilds", "dg_quant.adapters.domainbed"
    assert offenders(py_files(ROOT / "adapters" / "wilds"), lambda m: within(m, domainbed)) == {}
    assert offenders(py_files(ROOT / "adapters" / "domainbed"), lambda m: within(m, wilds)) == {}


def test_plugins_and_adapters_are_imported_by_their_installed_names() -> None:
    files = [*py_files(ROOT / "plugins"), *py_files(ROOT / "adapters")]
    assert offenders(files, lambda m: m.split(".")[0] in ("plugins", "adapters")) == {}


def test_no_conftest_at_the_repository_root() -> None:
    assert not (ROOT / "conftest.py").exists()


def test_installed_subpackages_resolve_to_the_repository_folders() -> None:
    import dg_quant.adapters
    import dg_quant.plugins

    assert Path(dg_quant.plugins.__file__).parent == ROOT / "plugins"
    assert Path(dg_quant.adapters.__file__).parent == ROOT / "adapters"
    assert Path(dg_quant.__file__).parent == CORE


def test_every_subpackage_is_listed_for_the_wheel() -> None:
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    mapping = {"dg_quant": CORE, "dg_quant.plugins": ROOT / "plugins", "dg_quant.adapters": ROOT / "adapters"}
    found = set()
    for prefix, folder in mapping.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((prefix, *rel)))
    assert found <= listed, f"add to [tool.setuptools].packages: {sorted(found - listed)}"


def test_top_level_plugins_is_not_importable_outside_the_repository(tmp_path) -> None:
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('plugins') is not None)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True)
    assert result.returncode == 0
    assert dg_quant.__version__


def test_the_core_reads_no_host_run_folder() -> None:
    """Run folders are the hosts' business (``adapters/wilds/run_results.py``); the core tabulates records."""
    names = ("final.json", "results.jsonl", "config.json", "eoq.json")
    assert [str(p.relative_to(ROOT)) for p in py_files(CORE) if any(n in p.read_text() for n in names)] == []
