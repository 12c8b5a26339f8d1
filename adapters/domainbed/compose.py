"""Quantization on top of any DomainBed algorithm: ``<Algorithm>_<Method>``, built when first asked for.

``get_algorithm_class("CORAL_QTDoG")`` returns DomainBed's ``CORAL`` with QT-DoG attached; the
methods are ``QTDoG``, ``LSQ``, ``INQ`` and ``OBC`` (``COMPOSABLE``), the same plugins as the
stand-alone algorithms of that name. The algorithm is left as it is: its ``__init__`` builds its
networks and optimizers, then the plugins quantize the networks that ``predict`` runs
(``PredictPath``) and every optimizer holding a quantized weight gets its step sizes, with the
weight's learning rate and weight decay. Its ``update`` runs unchanged; around it the plugins'
step hooks run: ``dgq_step_start`` before it (QT-DoG's switch, INQ's partitions), and
``dgq_after_backward``/``dgq_after_step`` around every ``step()`` of an optimizer that trains a
quantized weight, whichever optimizer it is (DANN's two, IRM's rebuilt one, MLDG's inner one).

dg-quant's own DG methods without a quantizer (``MixStyle``, ``SWAD``: ``AlgorithmSpec.attachable``)
take the methods the same way, by plugins: ``SWAD_QTDoG`` is the algorithm of the plugins
``dg_quant.swad`` and ``dg_quant.qtdog``, with the hparams of both (as ``wilds_run --plugin
dg_quant.swad --plugin dg_quant.qtdog``).

Composed classes are made on demand (``resolve``) and never added to ``ALGORITHMS``, so a
default sweep runs what it ran before; a sweep names them with ``--algorithms CORAL_QTDoG``.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from dg_quant.adapters.domainbed.algorithms import (
    SPECS,
    AlgorithmSpec,
    DGQuantAlgorithm,
    TrainerState,
    algorithm_classes,
    domain_labels,
    run_config,
)
from dg_quant.adapters.domainbed.predict_path import PredictPath
from dg_quant.adapters.domainbed.runlength import checkpoint_every, run_length, train_flags
from dg_quant.errors import ConfigError
from dg_quant.host import PluginHost
from dg_quant.loop import Trainer
from dg_quant.quant import is_quantized, iter_quantizers

# Methods that attach to any algorithm: they act through the model and the optimizer step only
# (SAGM and FQAT compute the gradients themselves, which the algorithm's update() does).
COMPOSABLE = ("QTDoG", "LSQ", "INQ", "OBC")

# DomainBed algorithms that cannot carry quantizers, why, and for which methods (None: all).
_GRAD_ALL = (
    "differentiates its loss w.r.t. every network parameter (autograd.grad without allow_unused), and the step "
    "size of a quantizer that is still off is not in the graph"
)
_GRAD_ALL_BASES = ("ANDMask", "SANDMask")
REFUSED: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "Fish": ("rebuilds its network every step from a state_dict of unquantized layout (networks.WholeFish)", None),
    "ERMPlusPlus": ("predicts with a moving average copied key by key from the trained network's state_dict", None),
    "ANDMask": (_GRAD_ALL, ("QTDoG", "OBC")),
    "SANDMask": (_GRAD_ALL, ("QTDoG", "OBC")),
    "IGA": (
        "differentiates its per-domain gradients a second time (create_graph=True), which LSQ's "
        "straight-through rounding does not support",
        ("QTDoG", "LSQ", "OBC"),
    ),
}


def refusal(base: str, method: str) -> str | None:
    """Why ``<base>_<method>`` cannot be built, or None."""
    reason, methods = REFUSED.get(base, (None, None))
    return reason if reason is not None and (methods is None or method in methods) else None


def split_name(name: str) -> tuple[str, str] | None:
    """``("CORAL", "QTDoG")`` for ``"CORAL_QTDoG"``; None for a name that is not composed."""
    base, sep, method = name.rpartition("_")
    if not sep or not base or method not in COMPOSABLE:
        return None
    return base, method


def composed_name(base: str, method: str) -> str:
    return f"{base}_{method}"


def _optimizers(obj: Any) -> Iterator[torch.optim.Optimizer]:
    """The optimizers an algorithm keeps as attributes (also in lists, tuples and dicts)."""
    values = list(vars(obj).values())
    while values:
        value = values.pop(0)
        if isinstance(value, torch.optim.Optimizer):
            yield value
        elif isinstance(value, list | tuple):
            values[:0] = list(value)
        elif isinstance(value, dict) and not isinstance(value, nn.Module):
            values[:0] = list(value.values())


def add_missing_parameters(optimizers: list[torch.optim.Optimizer], view: nn.Module) -> int:
    """Give each optimizer the new parameters (step sizes) of the modules whose weights it trains.

    A module's new parameters join the optimizer group that holds one of its existing ones, with
    that group's settings (learning rate, weight decay, betas); returns how many were added.
    """
    owner: dict[int, tuple[torch.optim.Optimizer, int]] = {}
    for opt in optimizers:
        for index, group in enumerate(opt.param_groups):
            for p in group["params"]:
                owner.setdefault(id(p), (opt, index))
    added: dict[tuple[int, int], tuple[torch.optim.Optimizer, int, list[nn.Parameter]]] = {}
    for module in view.children():
        params = list(module.parameters())
        home = next((owner[id(p)] for p in params if id(p) in owner), None)
        if home is None:
            continue  # a module no optimizer trains (frozen) keeps its quantizers' steps fixed too
        missing = [p for p in params if id(p) not in owner and p.requires_grad]
        for p in missing:
            owner[id(p)] = home
        if missing:
            added.setdefault((id(home[0]), home[1]), (home[0], home[1], []))[2].extend(missing)
    for opt, index, params in added.values():
        settings = {k: v for k, v in opt.param_groups[index].items() if k != "params"}
        opt.add_param_group({"params": params, **settings})
    return sum(len(params) for _, _, params in added.values())


class ComposedAlgorithm(TrainerState):
    """A DomainBed algorithm with dg-quant plugins attached; the first base of a composed class."""

    PLUGINS: tuple[str, ...] = ()
    BASE: str = ""
    METHOD: str = ""
    PACKAGE = "domainbed"
    TOTAL_STEPS: int | None = None

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]
    ) -> None:
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self._init_args = (input_shape, num_classes, num_domains, hparams)
        view = PredictPath.trace(self, tuple(input_shape))
        host = PluginHost(self.PLUGINS)
        argv = sys.argv[1:]
        total = self.TOTAL_STEPS or run_length(argv, package=self.PACKAGE)
        every = checkpoint_every(argv, package=self.PACKAGE)
        config = run_config(host, hparams, total, train_flags(argv).dataset, every)
        host.hook.dgq_configure_model(model=view, config=config, context=host.context)
        if self.BASE in _GRAD_ALL_BASES and any(not q.enabled for _, q in iter_quantizers(view)):
            raise ConfigError(
                f"{type(self).__name__} with quant_start_step > 0 is not available: {self.BASE} {_GRAD_ALL}; "
                "set quant_start_step=0"
            )
        optimizers = list(_optimizers(self))
        add_missing_parameters(optimizers, view)
        for opt in optimizers:
            host.hook.dgq_configure_optimizer(optimizer=opt, model=view, config=config, context=host.context)
        primary = next((o for o in optimizers if _trains(o, view)), optimizers[0] if optimizers else None)
        self.trainer = Trainer(host, view, primary, F.cross_entropy, config)

    @property
    def dgq_model(self) -> nn.Module:
        """What the plugins see as the model: the networks ``predict`` runs."""
        return self.trainer.model

    def update(self, minibatches: list[Any], unlabeled: Any = None) -> dict[str, float]:
        """The algorithm's own update, with the plugins' step hooks around its optimizer steps."""
        trainer = self.trainer
        trainer.host.hook.dgq_step_start(
            model=trainer.model,
            optimizer=trainer.optimizer,
            step=trainer.step,
            config=trainer.config,
            context=trainer.context,
            domains=domain_labels(minibatches),
        )
        with _step_hooks(trainer):
            metrics = dict(super().update(minibatches, unlabeled))
        trainer.step += 1
        # 1.0 once the model computes with quantized weights (records selection reads it).
        metrics["quantized"] = float(is_quantized(trainer.model))
        return metrics

    def __deepcopy__(self, memo: dict[int, Any]) -> ComposedAlgorithm:
        """A rebuilt algorithm holding a copy of this one's weights (the plugin host cannot be copied)."""
        clone = type(self)(*copy.deepcopy(self._init_args, memo))
        clone.load_state_dict(self.state_dict())
        clone.to(next(self.parameters()).device)
        return clone.train(self.training)


def _trains(optimizer: torch.optim.Optimizer, view: nn.Module) -> bool:
    ids = {id(p) for p in view.parameters()}
    return any(id(p) in ids for group in optimizer.param_groups for p in group["params"])


@contextlib.contextmanager
def _step_hooks(trainer: Trainer) -> Iterator[None]:
    """For the duration of one update: the plugins' hooks around each optimizer step that trains
    a quantized network (optimizers the algorithm builds inside ``update`` included)."""
    hook, view = trainer.host.hook, trainer.model

    def before(optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        if _trains(optimizer, view):
            hook.dgq_after_backward(
                model=view, optimizer=optimizer, step=trainer.step, config=trainer.config, context=trainer.context
            )

    def after(optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        if _trains(optimizer, view):
            hook.dgq_after_step(
                model=view,
                optimizer=optimizer,
                step=trainer.step,
                metrics={},
                config=trainer.config,
                context=trainer.context,
            )

    handles = [
        register_optimizer_step_pre_hook(before),
        register_optimizer_step_post_hook(after),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def composed_class(algorithms: ModuleType, name: str, total_steps: int | None = None) -> type | None:
    """The class ``name`` (``<Algorithm>_<Method>``) over ``algorithms``' classes; None if ``name``
    is not a composed name of an algorithm there; ``ConfigError`` for a refused combination."""
    parts = split_name(name)
    if parts is None:
        return None
    base_name, method = parts
    base = getattr(algorithms, base_name, None)
    if not (isinstance(base, type) and issubclass(base, algorithms.Algorithm)):
        return None
    if issubclass(base, DGQuantAlgorithm) and base.ATTACHABLE:
        return _with_plugins(algorithms, base, name, method, total_steps)
    if issubclass(base, DGQuantAlgorithm | ComposedAlgorithm):
        raise ConfigError(
            f"{name}: {base_name} is a dg-quant algorithm already; quantization attaches to DomainBed's own "
            f"algorithms and to {', '.join(s.name for s in SPECS if s.attachable)} (use LSQ_SAGM for SAGM with LSQ)"
        )
    reason = refusal(base_name, method)
    if reason is not None:
        raise ConfigError(f"{name} is not available: {base_name} {reason}")
    spec = next(s for s in SPECS if s.name == method)
    namespace = {
        "__doc__": f"{base_name} with {spec.doc}",
        "__module__": algorithms.__name__,
        "__qualname__": name,
        "PLUGINS": spec.plugins,
        "BASE": base_name,
        "METHOD": method,
        "PACKAGE": algorithms.__name__.rsplit(".", 1)[0],
        "TOTAL_STEPS": total_steps,
    }
    return type(name, (ComposedAlgorithm, base), namespace)


def _with_plugins(algorithms: ModuleType, base: type, name: str, method: str, total_steps: int | None) -> type:
    """``<Own>_<Method>`` for a dg-quant algorithm without a quantizer: its plugins, then the method's."""
    spec = next(s for s in SPECS if s.name == method)
    doc = f"{(base.__doc__ or base.__name__).rstrip('.')}, with {spec.doc}"
    own = AlgorithmSpec(name, (*base.PLUGINS, *spec.plugins), doc)
    return algorithm_classes([own], algorithms.Algorithm, base.networks, algorithms.__name__, total_steps)[name]


# Attribute holding the function a patched ``get_algorithm_class`` wraps (re-registering replaces it).
_ORIGINAL_ATTR = "_dgq_original"


def install_resolver(algorithms: ModuleType, total_steps: int | None = None) -> None:
    """Make ``algorithms.get_algorithm_class`` (and attribute access) build composed classes on demand.

    A class is built once and kept as a module attribute, so DomainBed's ``globals()`` lookup and
    later calls find it; ``ALGORITHMS`` does not change.
    """
    original = getattr(algorithms.get_algorithm_class, _ORIGINAL_ATTR, algorithms.get_algorithm_class)

    def build(name: str) -> type | None:
        cls = composed_class(algorithms, name, total_steps)
        if cls is not None:
            setattr(algorithms, name, cls)
        return cls

    def get_algorithm_class(algorithm_name: str) -> type:
        """Return the algorithm class with the given name (``<Algorithm>_<Method>`` built on demand)."""
        if algorithm_name not in vars(algorithms):
            build(algorithm_name)
        return original(algorithm_name)  # DomainBed's own NotImplementedError for an unknown name

    def module_getattr(attr: str) -> type:
        cls = build(attr) if not attr.startswith("__") else None
        if cls is None:
            raise AttributeError(f"module {algorithms.__name__!r} has no attribute {attr!r}")
        return cls

    setattr(get_algorithm_class, _ORIGINAL_ATTR, original)
    algorithms.get_algorithm_class = get_algorithm_class
    algorithms.__getattr__ = module_getattr


def composed_names(algorithms: ModuleType) -> dict[str, str | None]:
    """Every ``<Algorithm>_<Method>`` over ``algorithms.ALGORITHMS``' DomainBed algorithms and
    dg-quant's attachable ones (MixStyle, SWAD), with the reason it is refused (None: available)."""
    names: dict[str, str | None] = {}
    for base in algorithms.ALGORITHMS:
        cls = getattr(algorithms, base, None)
        own = isinstance(cls, type) and issubclass(cls, DGQuantAlgorithm | ComposedAlgorithm)
        if cls is None or (own and not getattr(cls, "ATTACHABLE", False)):
            continue
        for method in COMPOSABLE:
            names[composed_name(base, method)] = refusal(base, method)
    return names
