"""DomainBed hyperparameters of the dg-quant algorithms, built from the plugins' options.

Every option a plugin adds (``dgq_add_options``) becomes a DomainBed hparam with the same name
and default as the ``wilds_run`` flag; its random-search value comes from the option's
``search`` sampler. As in DomainBed's registry, each name draws from its own RNG seeded by
``seed_hash(random_seed, name)``, so adding an hparam never shifts the others' draws, and every
value is a plain Python scalar, so ``results.jsonl`` and ``model.pkl`` stay JSON-safe.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from dg_quant.errors import ConfigError
from dg_quant.host import PluginHost
from dg_quant.options import declared_options, option_search_space

Sampler = Callable[[np.random.RandomState], Any]
SeedHash = Callable[..., int]
RunLength = Callable[[str], "int | None"]  # dataset name -> the run's number of steps

# Options that set the size of the model: a random search keeps them at their default, so that
# model selection compares runs at one bit width (pin another with --hparams '{"bits": 4}').
MODEL_SIZE_OPTIONS = ("bits", "act_bits")

# Attribute marking a wrapped ``_hparams`` with the function it wraps (re-registering replaces it).
_ORIGINAL_ATTR = "_dgq_original"


def plain(name: str, value: Any) -> Any:
    """``value`` as a JSON-safe Python scalar (numpy scalars unwrapped), or a ``ConfigError``."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ConfigError(
        f"hyperparameter {name!r} has the value {value!r}; its default and sampler must give a plain "
        "int, float, str, bool or None"
    )


@dataclass(frozen=True)
class HParam:
    """One hyperparameter: its default and how a random search draws it (None: keep the default)."""

    default: Any
    search: Sampler | None = None

    def draw(self, name: str, seed: int) -> Any:
        if self.search is None:
            return self.default
        return plain(name, self.search(np.random.RandomState(seed)))


def options_parser(host: PluginHost) -> argparse.ArgumentParser:
    """A parser holding every option of the host's plugins (what ``wilds_run`` would accept)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    host.add_options(parser)
    return parser


def _samplers(parser: argparse.ArgumentParser) -> dict[str, Sampler | None]:
    """The ``search`` sampler of each option, from the first dataclass declaring it (as its flag)."""
    samplers: dict[str, Sampler | None] = {}
    for cls in declared_options(parser):
        for name, sampler in option_search_space(cls).items():
            samplers.setdefault(name, sampler)
    return samplers


# An hparam whose default depends on the dataset and the run length (QT-DoG's switch step).
DatasetHParam = Callable[[str, "int | None"], HParam]


def plugin_hparams(
    plugins: Iterable[str], overrides: Mapping[str, HParam | DatasetHParam] | None = None
) -> dict[str, HParam | DatasetHParam]:
    """The hparams of an algorithm made of ``plugins``: every plugin option, then ``overrides``."""
    parser = options_parser(PluginHost(plugins))
    defaults = vars(parser.parse_args([]))
    samplers = _samplers(parser)
    specs = {}
    for name, default in defaults.items():
        search = None if name in MODEL_SIZE_OPTIONS else samplers.get(name)
        specs[name] = HParam(plain(name, default), search)
    for name, spec in (overrides or {}).items():
        specs[name] = HParam(plain(name, spec.default), spec.search) if isinstance(spec, HParam) else spec
    return specs


def resolve_hparams(
    specs: Mapping[str, HParam | DatasetHParam], dataset: str, run_length: RunLength | None
) -> dict[str, HParam]:
    """``specs`` for one dataset: each per-dataset entry called with the dataset and run length."""
    if all(isinstance(spec, HParam) for spec in specs.values()):
        return dict(specs)  # type: ignore[arg-type]
    steps = run_length(dataset) if run_length is not None else None
    resolved = {}
    for name, spec in specs.items():
        spec = spec if isinstance(spec, HParam) else spec(dataset, steps)
        resolved[name] = HParam(plain(name, spec.default), spec.search)
    return resolved


def draw_hparams(specs: Mapping[str, HParam], random_seed: int, seed_hash: SeedHash) -> dict[str, tuple[Any, Any]]:
    """``{name: (default, random value)}`` in DomainBed's format, one RNG per name."""
    return {name: (spec.default, spec.draw(name, seed_hash(random_seed, name))) for name, spec in specs.items()}


def extend_registry(
    registry: ModuleType,
    specs: Mapping[str, Mapping[str, HParam | DatasetHParam]],
    seed_hash: SeedHash,
    run_length: RunLength | None = None,
    split: Callable[[str], tuple[str, str] | None] | None = None,
) -> None:
    """Make ``registry._hparams`` (hence ``default_hparams``/``random_hparams``) know ``specs``.

    ``specs`` maps an algorithm name to its hparams. DomainBed's own entries for the algorithm
    (``lr``, ``batch_size``, ``freeze_bn``, ...) come first and win over a same-named option.
    Calling it again replaces the previous extension instead of stacking a second one.
    A per-dataset entry gets the dataset and ``run_length(dataset)`` (the run's steps).
    A name that ``split`` maps to ``(algorithm, method)`` (``CORAL_QTDoG``) gets DomainBed's
    entries for the algorithm plus ``specs[algorithm]`` (a dg-quant one: ``MixStyle_QTDoG``) and
    ``specs[method]``.
    """
    original = getattr(registry._hparams, _ORIGINAL_ATTR, registry._hparams)
    table = {algorithm: dict(entries) for algorithm, entries in specs.items()}

    def _hparams(algorithm: str, dataset: str, random_seed: int) -> dict[str, tuple[Any, Any]]:
        parts = split(algorithm) if split is not None and algorithm not in table else None
        base, method = parts if parts is not None else (algorithm, algorithm)
        hparams = original(base, dataset, random_seed)
        # a dg-quant base (MixStyle_QTDoG) brings its own plugins' hparams; the method's win
        entries = {**table.get(base, {}), **table.get(method, {})}
        extra = {k: v for k, v in entries.items() if k not in hparams}
        hparams.update(draw_hparams(resolve_hparams(extra, dataset, run_length), random_seed, seed_hash))
        return hparams

    _hparams.__doc__ = original.__doc__
    setattr(_hparams, _ORIGINAL_ATTR, original)
    registry._hparams = _hparams
