"""The DomainBed host: dg-quant algorithms registered into a DomainBed checkout, and a launcher.

``register()`` adds ``QTDoG``, ``LSQ`` (and ``FQAT``, ``SAGM``, ``LSQ_SAGM``, ``INQ``, ``OBC``,
``MixStyle``, ``SWAD`` when their plugins are installed) to ``domainbed.algorithms`` and their hyperparameters to
``domainbed.hparams_registry``, in this process, and makes ``get_algorithm_class`` build
``<Algorithm>_<Method>`` (``CORAL_QTDoG``, ``DANN_INQ``, ...: any DomainBed algorithm with a
quantization method attached, and ``MixStyle_QTDoG``, ``SWAD_QTDoG``, ..., see ``compose``) on demand, without adding them to ``ALGORITHMS``. ``python -m dg_quant.adapters.domainbed
train|sweep|collect_results ...`` registers them and runs DomainBed's own scripts, with sweep
jobs started through the same entry point so that they see the algorithms too.
"""

from __future__ import annotations

import functools
import importlib
import sys
import warnings
from pathlib import Path
from typing import Any

from dg_quant.adapters.domainbed.algorithms import algorithm_classes, available_specs, hparam_table
from dg_quant.adapters.domainbed.compose import install_resolver, split_name
from dg_quant.adapters.domainbed.hparams import extend_registry
from dg_quant.adapters.domainbed.runlength import run_length

__all__ = ["load_algorithm", "register"]


def _run_length(total_steps: int | None, package: str, dataset: str) -> int | None:
    return total_steps or run_length(sys.argv[1:], dataset, package)


# Attribute marking a class as registered by dg-quant (a re-registration may replace it).
_MARK = "_dgq_registered"


def register(package: str = "domainbed", total_steps: int | None = None) -> list[str]:
    """Register the available dg-quant algorithms into DomainBed (importable as ``package``).

    Idempotent. An algorithm name that DomainBed already defines (a fork's own class) is left
    alone with a warning. Returns the names registered. ``total_steps`` is the run length;
    by default it is read from the command line as ``train.py`` reads it (``--steps``, else the
    ``--dataset``'s ``N_STEPS``), which a script with other flags must replace.
    """
    algorithms = importlib.import_module(f"{package}.algorithms")
    networks = importlib.import_module(f"{package}.networks")
    registry = importlib.import_module(f"{package}.hparams_registry")
    misc = importlib.import_module(f"{package}.lib.misc")

    specs = []
    for spec in available_specs():
        existing = getattr(algorithms, spec.name, None)
        if existing is not None and not getattr(existing, _MARK, False):
            warnings.warn(
                f"{package}.algorithms already defines {spec.name}; dg-quant's is not registered", stacklevel=2
            )
            continue
        specs.append(spec)
    classes = algorithm_classes(specs, algorithms.Algorithm, networks, algorithms.__name__, total_steps)
    for name, cls in classes.items():
        setattr(cls, _MARK, True)
        setattr(algorithms, name, cls)
        if name not in algorithms.ALGORITHMS:
            algorithms.ALGORITHMS.append(name)
    install_resolver(algorithms, total_steps)
    extend_registry(
        registry,
        hparam_table(specs),
        misc.seed_hash,
        functools.partial(_run_length, total_steps, package),
        split_name,
    )
    return list(classes)


def load_algorithm(path: str, device: str = "cpu", package: str = "domainbed") -> Any:
    """A trained DomainBed algorithm from its ``model.pkl`` (any algorithm, dg-quant's or DomainBed's).

    DomainBed's reload recipe, with the algorithms registered and the backbone built without
    downloading ImageNet weights (works offline; the saved weights replace them anyway). The
    file is unpickled in full (``weights_only=False``): load only files you trust.
    """
    import torch

    from dg_quant.adapters.domainbed.finish import load_algorithm as _load

    register(package)
    return _load(Path(path), importlib.import_module(f"{package}.algorithms"), torch.device(device))
