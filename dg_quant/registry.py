"""A timm-style registry of backbone adapters: ``create_adapter(name, num_classes, ...)``.

A backbone name is resolved, in this order, as

1. a registered adapter: the built-in ones in ``dg_quant.adapters.backbones`` (registered with
   ``@register_adapter`` when that package is imported; the core imports it lazily by name);
2. an entry point in the group ``dg_quant.backbones`` of an installed package;
3. ``package.module:factory``: a function imported from an importable module.

So a user's own backbone is found again by every command that rebuilds a run from its saved
name, not only by the process that registered it (see ``docs/backbones.md``).
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import inspect
from collections.abc import Callable
from typing import Any

from dg_quant.errors import CheckpointError, ConfigError
from dg_quant.model import DGModel

AdapterFn = Callable[..., DGModel]

BUILTIN_ADAPTER_PACKAGE = "dg_quant.adapters.backbones"
ENTRY_POINT_GROUP = "dg_quant.backbones"
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


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def list_adapters(pattern: str = "*") -> list[str]:
    """Registered and entry-point adapter names matching the fnmatch ``pattern``, sorted."""
    _load_builtins()
    names = set(_ADAPTERS) | set(_entry_points())
    return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))


def _import_factory(spec: str) -> AdapterFn:
    """``package.module:factory`` -> the function, with one-line errors naming what is wrong."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"backbone {spec!r}: write it as package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"backbone {spec!r}: cannot import {exc.name!r}; install the package or add its folder to PYTHONPATH"
        ) from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(f"backbone {spec!r}: module {module_name} has no {attr!r}")
    if not callable(fn):
        raise ConfigError(f"backbone {spec!r}: {attr} is not a function or class")
    return fn


def resolve_adapter(name: str) -> AdapterFn:
    """The factory behind a backbone name (registered, entry point or ``module:factory``)."""
    _load_builtins()
    if name in _ADAPTERS:
        return _ADAPTERS[name]
    eps = _entry_points()
    if name in eps:
        try:
            fn = eps[name].load()
        except Exception as exc:  # a broken third-party package: say which one
            raise ConfigError(
                f"backbone {name!r} (entry point {eps[name].value}) failed to load: {type(exc).__name__}: {exc}"
            ) from None
        if not callable(fn):
            raise ConfigError(f"backbone {name!r}: entry point {eps[name].value} is not callable")
        return fn
    if ":" in name:
        return _import_factory(name)
    raise ConfigError(
        f"unknown backbone {name!r}; known backbones: {', '.join(list_adapters())} "
        "(or give package.module:factory, see docs/backbones.md)"
    )


def adapter_accepts(fn: AdapterFn, argument: str) -> bool:
    """Whether ``fn`` takes the keyword ``argument`` (by name, or through ``**kwargs``).

    Hosts pass optional settings (``img_size``, ``max_token_length``, ``weights``) only to
    adapters that declare them, so an adapter does not need to accept every host setting.
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: assume it takes keywords
        return True
    if argument in params:
        return params[argument].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def create_adapter(name: str, num_classes: int, **kwargs: Any) -> DGModel:
    """Build the backbone ``name`` (see ``resolve_adapter``); ``None`` keyword values are dropped.

    Dropping ``None`` lets command-line defaults of ``None`` fall back to each adapter's own
    defaults, as ``timm.create_model`` does.
    """
    fn = resolve_adapter(name)
    given = {k: v for k, v in kwargs.items() if v is not None}
    refused = [k for k in given if not adapter_accepts(fn, k)]
    if refused:
        raise ConfigError(f"backbone {name!r} takes no {', '.join(refused)} argument; leave it out")
    model = fn(num_classes=num_classes, **given)
    if not isinstance(model, DGModel):
        raise ConfigError(
            f"backbone {name!r} returned a {type(model).__name__}, not a dg_quant.DGModel "
            "(featurizer + classifier); see docs/backbones.md"
        )
    return model


def rebuild_adapter(meta: dict[str, Any]) -> DGModel:
    """The network an export or checkpoint names in ``meta`` (``backbone``, ``num_classes``, ``backbone_kwargs``).

    The builder handed to ``dg_quant.quant.export.load_export`` when no model is at hand;
    ``backbone_kwargs`` are the adapter settings that shape the network (e.g. a ViT's img_size).
    """
    if "backbone" not in meta or "num_classes" not in meta:
        raise CheckpointError("the export does not name its backbone; pass the model to load_export")
    return create_adapter(meta["backbone"], num_classes=int(meta["num_classes"]), **meta.get("backbone_kwargs", {}))
