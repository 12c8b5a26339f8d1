"""Meta-tests: every hook is prefixed, documented argument by argument, and has a test."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from dg_quant import hookspecs

HOOKS = [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("dgq_")]
TESTS = Path(__file__).parent


def test_every_spec_is_prefixed() -> None:
    specs = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "dg_quant_spec")]
    assert specs and all(n.startswith("dgq_") for n in specs)
    assert sorted(specs) == sorted(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_hook_documents_every_argument(name: str) -> None:
    func = getattr(hookspecs, name)
    doc = inspect.getdoc(func) or ""
    params = list(inspect.signature(func).parameters)
    assert doc.splitlines()[0].strip(), f"{name} needs a one-line summary"
    for param in params:
        assert f":param {param}:" in doc, f"{name} does not document {param}"
    assert "versionadded" in doc


@pytest.mark.parametrize("name", HOOKS)
def test_hook_has_a_test(name: str) -> None:
    sources = "\n".join(p.read_text() for p in TESTS.rglob("test_*.py"))
    assert f"def test_hook_{name}" in sources, f"write tests/test_hooks.py::test_hook_{name}"
