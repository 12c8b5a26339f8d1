"""A timm-style registry of backbone adapters: ``create_adapter(name, num_classes, ...)``.

Adapters live in ``dg_quant.adapters.backbones`` and register themselves with
``@register_adapter`` when that package is imported; the core imports it lazily by name.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable
from typing import Any

from dg_quant.errors import ConfigError
from dg_quant.model import DGModel

AdapterFn = Callable[..., DGModel]

BUILTIN_ADAPTER_PACKAGE = "dg_quant.adapters.backbones"
_ADAPTERS: dict[str, AdapterFn] = {}


def register_adapter(fn: AdapterFn | None = None, *, name: str | None = None) -> Any:
    """Decorator: register ``fn(num_classes, **kwargs) -> DGModel`` under ``name`` (or its own)."""

    def decorate(f: AdapterFn) -> AdapterFn:
        key = name or f.__name__
        if key in _ADAPTERS and _ADAPTERS[key] is not f:
            raise ConfigError(f"adapter {key!r} is registered twice; rename one")
        _ADAPTERS[key] = f
        return f

    return decorate(fn) if fn is not None else decorate


def _load_builtins() -> None:
    importlib.import_module(BUILTIN_ADAPTER_PACKAGE)


def list_adapters(pattern: str = "*") -> list[str]:
    """Registered adapter names matching the fnmatch ``pattern``, sorted."""
    _load_builtins()
    return sorted(n for n in _ADAPTERS if fnmatch.fnmatchcase(n, pattern))


def create_adapter(name: str, num_classes: int, **kwargs: Any) -> DGModel:
    """Build the model registered as ``name``; ``None`` keyword values are dropped.

    Dropping ``None`` lets command-line defaults of ``None`` fall back to each adapter's own
    defaults, as ``timm.create_model`` does.
    """
    _load_builtins()
    if name not in _ADAPTERS:
        raise ConfigError(f"unknown backbone {name!r}; known backbones: {', '.join(sorted(_ADAPTERS))}")
    return _ADAPTERS[name](num_classes=num_classes, **{k: v for k, v in kwargs.items() if v is not None})
