"""Dependencies: every third-party import is declared, torch is bounded (not pinned), extras work."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from dg_quant.errors import ConfigError, require_optional

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# import name -> distribution name, where they differ
DISTRIBUTION_OF = {"sklearn": "scikit-learn", "open_clip": "open_clip_torch", "yaml": "pyyaml", "PIL": "pillow"}
# imported by dg-quant but installed by a declared dependency that guarantees them
PROVIDED_BY_DEPENDENCIES = {
    "numpy": "torch",
    "PIL": "torchvision",
    "packaging": "wilds",
    "huggingface_hub": "timm",
    "scipy": "scikit-learn",
    "tokenizers": "transformers",
}


def _third_party_imports() -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    names: set[str] = set()
    for room in ("dg_quant", "plugins", "adapters"):
        for path in (ROOT / room).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module.split(".")[0])
                elif (
                    isinstance(node, ast.Call)
                    and getattr(node.func, "id", None) == "require_optional"
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                ):
                    names.add(node.args[0].value.split(".")[0])
    return {n for n in names if n not in stdlib and n not in ("dg_quant", "__future__")}


def _declared() -> dict[str, Requirement]:
    project = PYPROJECT["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return {r.name.lower().replace("_", "-"): r for r in reqs}


def test_every_third_party_import_is_declared() -> None:
    declared = _declared()
    missing = []
    for module in sorted(_third_party_imports()):
        dist = DISTRIBUTION_OF.get(module, module).lower().replace("_", "-")
        if dist not in declared and PROVIDED_BY_DEPENDENCIES.get(module, "").replace("_", "-") not in declared:
            missing.append(f"{module} ({dist})")
    assert missing == []


def test_torch_is_bounded_below_and_the_tested_pair_lives_in_constraints() -> None:
    deps = {Requirement(r).name: Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
    for name in ("torch", "torchvision"):
        specs = {s.operator for s in deps[name].specifier}
        assert "==" not in specs and ">=" in specs, f"{name} must be a lower bound, not a pin"
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert set(pins) >= {"torch", "torchvision"}
    import torch

    assert torch.__version__.split("+")[0] == pins["torch"]  # this venv was built with the constraints


def test_the_readme_setup_uses_the_constraints() -> None:
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("```")[1]
    assert "-c constraints.txt" in setup.splitlines()[1]


def _uninstall(module: str, monkeypatch) -> None:
    """Make ``import module`` (and its submodules, even when already imported) raise ModuleNotFoundError."""
    for name in [module, *(n for n in sys.modules if n.startswith(module + "."))]:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize(
    ("module", "extra"), [("open_clip", "clip"), ("transformers", "text"), ("matplotlib", "plots")]
)
def test_a_missing_extra_fails_in_one_line_naming_it(module, extra, monkeypatch) -> None:
    _uninstall(module, monkeypatch)
    with pytest.raises(ConfigError, match=rf"pip install 'dg-quant\[{extra}\]'") as info:
        require_optional(module)
    assert "\n" not in str(info.value)


def test_a_backbone_whose_extra_is_missing_names_the_extra(monkeypatch) -> None:
    from dg_quant.registry import create_adapter

    _uninstall("open_clip", monkeypatch)
    with pytest.raises(ConfigError, match=r"dg-quant\[clip\]"):
        create_adapter("test_clip_vit", num_classes=3)
