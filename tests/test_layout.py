"""Tripwires for the three-room layout (README, "Files"): ``plugins/`` and ``adapters/`` import the
``dg_quant`` core, the core imports neither, and a host reaches a method only through the hooks."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import dg_quant

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "dg_quant"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_imports_neither_plugins_nor_adapters() -> None:
    offenders = {}
    for path in CORE.rglob("*.py"):
        bad = {
            m
            for m in imported_modules(path)
            if m.startswith(("dg_quant.plugins", "dg_quant.adapters", "plugins", "adapters"))
        }
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_plugins_and_adapters_are_imported_by_their_installed_names() -> None:
    offenders = {}
    for room in ("plugins", "adapters", "tests"):
        for path in (ROOT / room).rglob("*.py"):
            bad = {m for m in imported_modules(path) if m.split(".")[0] in ("plugins", "adapters")}
            if bad:
                offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


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
