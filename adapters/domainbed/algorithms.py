"""dg-quant's methods as DomainBed algorithms: thin wrappers over ``Trainer`` and the plugin hooks.

Each algorithm is a list of plugins (the ones ``wilds_run --plugin`` takes), so DomainBed and
WILDS run the same hook code. The network is DomainBed's own ``networks.Featurizer`` and
``networks.Classifier`` (so ``resnet18``, ``resnet50_augmix``, ``freeze_bn`` and
``resnet_dropout`` behave as for ERM) wrapped in ``DGModel``; the optimizer is ERM's Adam.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dg_quant.adapters.domainbed.evaluation import (
    VAL_LOSS_KEY,
    VAL_LOSS_METRIC,
    CheckpointEvaluation,
    reads_evaluations,
)
from dg_quant.adapters.domainbed.hparams import (
    DatasetHParam,
    HParam,
    options_parser,
    plugin_hparams,
)
from dg_quant.adapters.domainbed.records import FINAL_MODEL_KEY
from dg_quant.adapters.domainbed.runlength import checkpoint_every, run_length, train_flags
from dg_quant.context import RunContext
from dg_quant.errors import ConfigError, PluginError
from dg_quant.host import PluginHost, resolve_plugin
from dg_quant.loop import Trainer, scalar_metrics
from dg_quant.model import DGModel
from dg_quant.quant import is_quantized
from dg_quant.schedule import paper_start_step
from dg_quant.speed import model_device

HOST = "domainbed"
# Keys that DomainBed's train.py writes itself; an update() metric of that name is renamed.
RESERVED_KEYS = ("step", "epoch", "step_time", "mem_gb", "hparams", "args")


@dataclass(frozen=True)
class AlgorithmSpec:
    """A DomainBed algorithm: its plugins and the hparams it sets differently from the plugins."""

    name: str
    plugins: tuple[str, ...]
    doc: str
    hparams: Mapping[str, HParam | DatasetHParam] = field(default_factory=dict)
    # A DG method without a quantizer: ``<name>_<Method>`` (``MixStyle_QTDoG``) is its plugins
    # plus the quantization method's (``compose``).
    attachable: bool = False


def qtdog_start(dataset: str, total_steps: int | None) -> HParam:
    """QT-DoG's switch step for the dataset and run length (2000 of 5000 steps, 8000 of 15000 on
    DomainNet, scaled down for shorter runs), searched over half, once and 1.5 times that."""
    start = paper_start_step(dataset, total_steps)
    return HParam(start, lambda r: int(r.choice([start // 2, start, start * 3 // 2])))


_FROM_START = HParam(0)

SPECS: tuple[AlgorithmSpec, ...] = (
    AlgorithmSpec(
        "QTDoG",
        ("dg_quant.qtdog",),
        "QT-DoG: ERM, then LSQ weight quantization from step quant_start_step (ICML 2025)",
        {"quant_start_step": qtdog_start},
    ),
    AlgorithmSpec(
        "LSQ",
        ("dg_quant.lsq",),
        "Plain LSQ quantization-aware training from the first step",
        {"quant_start_step": _FROM_START},
    ),
    AlgorithmSpec("FQAT", ("dg_quant.fqat",), "FQAT: flatness-oriented QAT with disorder-guided freezing"),
    AlgorithmSpec("SAGM", ("dg_quant.sagm",), "SAGM: sharpness-aware gradient matching (CVPR 2023)"),
    AlgorithmSpec(
        "LSQ_SAGM",
        ("dg_quant.lsq", "dg_quant.sagm"),
        "LSQ quantization-aware training with SAGM",
        {"quant_start_step": _FROM_START},
    ),
    AlgorithmSpec("INQ", ("dg_quant.inq",), "Incremental network quantization"),
    AlgorithmSpec(
        "OBC",
        ("dg_quant.obc",),
        "ERM in full precision, then OBC/GPTQ post-training quantization (QT-DoG Table 4's PTQ row)",
    ),
    AlgorithmSpec(
        "MixStyle",
        ("dg_quant.mixstyle",),
        "MixStyle: instance feature statistics mixed after the early CNN stages in training (ICLR 2021)",
        attachable=True,
    ),
    AlgorithmSpec(
        "SWAD",
        ("dg_quant.swad",),
        "SWAD: dense weight averaging over the in-domain validation loss valley (NeurIPS 2021)",
        attachable=True,
    ),
)


def domain_labels(minibatches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Each sample's training-environment index, for the minibatches concatenated in order."""
    return torch.cat(
        [torch.full((len(y),), i, dtype=torch.long, device=y.device) for i, (_, y) in enumerate(minibatches)]
    )


def plugin_available(name: str) -> bool:
    """True if plugin ``name`` imports and implements at least one hook."""
    try:
        plugin = resolve_plugin(name)
    except PluginError as exc:
        if "failed to import" in str(exc):
            warnings.warn(f"dg-quant: {exc}", stacklevel=2)
        return False
    except Exception as exc:  # a plugin that is broken must not break DomainBed
        warnings.warn(f"dg-quant: plugin {name!r} failed to import: {exc}", stacklevel=2)
        return False
    return any(attr.startswith("dgq_") for attr in dir(plugin))


def available_specs() -> list[AlgorithmSpec]:
    """The algorithms whose plugins are all installed."""
    return [spec for spec in SPECS if all(plugin_available(p) for p in spec.plugins)]


def run_config(
    host: PluginHost,
    hparams: Mapping[str, Any],
    total_steps: int | None = None,
    dataset: str | None = None,
    eval_every: int | None = None,
) -> argparse.Namespace:
    """The run's ``config`` (the plugins' option defaults, overridden by DomainBed's ``hparams``),
    with the host configured for a run of ``total_steps`` on ``dataset``, checkpointing every ``eval_every``."""
    parser = options_parser(host)
    for action in parser._actions:
        value = hparams.get(action.dest)
        if action.choices is not None and action.dest in hparams and value not in action.choices:
            raise ConfigError(
                f"hparam {action.dest}={value!r} is not one of {', '.join(map(repr, action.choices))}; "
                "fix it in --hparams"
            )
    config = parser.parse_args([])
    vars(config).update(hparams)
    # DomainBed tells an algorithm neither the number of steps nor an output folder: the run
    # length comes from train.py's flags (runlength), the folder only at the end (finish).
    host.configure(config, RunContext(host=HOST, dataset=dataset, total_steps=total_steps, eval_every=eval_every))
    return config


class TrainerState:
    """What every dg-quant DomainBed algorithm (its own or a composed one) keeps of its ``Trainer``.

    The step counter, the plugins' states (FQAT's frozen set, ...) and the summary of a final
    model (SWAD's average) travel in the state_dict, so a reloaded model.pkl knows where it was
    and what it decided.
    """

    trainer: Trainer
    final_summary: dict[str, Any] | None = None  # dgq_final_model's summary, once it replaced the model

    def evaluation_extras(self) -> dict[str, Any]:
        """What the plugins add to an evaluation (compression ratio, ...); DomainBed never asks."""
        return self.trainer.evaluation_extras()

    def get_extra_state(self) -> dict[str, Any]:
        state = {"step": self.trainer.step, "plugins": self.trainer.plugin_state_dict()}
        if self.final_summary is not None:
            state["final_model"] = self.final_summary
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.trainer.step = int(state["step"])
        self.trainer.load_plugin_state_dict(state.get("plugins", {}))
        self.final_summary = state.get("final_model")


class DGQuantAlgorithm(TrainerState):
    """DomainBed's ``Algorithm`` contract on top of ``dg_quant.loop.Trainer``.

    Used as the first base of a class that also derives from DomainBed's ``Algorithm`` (see
    ``algorithm_classes``), which supplies ``networks``, the DomainBed module to build from.
    """

    PLUGINS: tuple[str, ...] = ()
    networks: ModuleType
    PACKAGE = "domainbed"  # the module DomainBed imports as (where its datasets live)
    TOTAL_STEPS: int | None = None  # register(total_steps=...); else train.py's flags say
    ATTACHABLE = False  # AlgorithmSpec.attachable

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]
    ) -> None:
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self._init_args = (input_shape, num_classes, num_domains, hparams)
        featurizer = self.networks.Featurizer(input_shape, hparams)
        classifier = self.networks.Classifier(
            featurizer.n_outputs, num_classes, hparams.get("nonlinear_classifier", False)
        )
        self.network = DGModel(featurizer, classifier, featurizer.n_outputs)
        host = PluginHost(self.PLUGINS)
        argv = sys.argv[1:]
        flags = train_flags(argv)
        total = self.TOTAL_STEPS or run_length(argv, package=self.PACKAGE)
        every = checkpoint_every(argv, package=self.PACKAGE)
        config = run_config(host, hparams, total, flags.dataset, every)
        self.trainer = Trainer.build(host, self.network, config, self._make_optimizer, F.cross_entropy)
        # SWAD's validation losses and final model, on train.py's checkpoints (``evaluation``).
        self._evaluation = (
            CheckpointEvaluation(flags, total, every, hparams, num_domains, self.PACKAGE)
            if reads_evaluations(host.hook)
            else None
        )

    def _make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """ERM's optimizer, over everything trainable after the plugins configured the model."""
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])

    @property
    def dgq_model(self) -> nn.Module:
        """What the plugins see as the model (``finish`` post-training quantizes it)."""
        return self.network

    @property
    def featurizer(self) -> nn.Module:
        return self.network.featurizer

    @property
    def classifier(self) -> nn.Module:
        return self.network.classifier

    def update(self, minibatches: list[tuple[torch.Tensor, torch.Tensor]], unlabeled: Any = None) -> dict[str, float]:
        """One training step on the source domains' minibatches, concatenated as ERM does; each
        sample's domain is the index of its training environment (MixStyle's cross-domain pairs)."""
        x = torch.cat([x for x, _ in minibatches])
        y = torch.cat([y for _, y in minibatches])
        step = self.trainer.step  # train.py's 0-based step
        metrics = scalar_metrics(self.trainer.train_step((x, y), domains=domain_labels(minibatches)))
        metrics.update(self._after_update(step))
        # 1.0 once the model computes with quantized weights (LSQ on, every INQ weight frozen);
        # it never goes back, so a checkpoint whose window mean is > 0 was evaluated quantized.
        metrics["quantized"] = float(is_quantized(self.network))
        return {(f"train_{k}" if k in RESERVED_KEYS else k): v for k, v in metrics.items()}

    def _after_update(self, step: int) -> dict[str, float]:
        """At train.py's checkpoints: the validation loss for the plugins; after the last update,
        the final model (SWAD's average), which train.py then evaluates and saves as the run's."""
        evaluation, name = self._evaluation, type(self).__name__
        if evaluation is None:
            return {}
        metrics: dict[str, float] = {}
        device = model_device(self.network)
        if evaluation.is_checkpoint(step, name):
            loss = evaluation.validation_loss(self, device)
            self.trainer.evaluated({VAL_LOSS_KEY: loss})
            metrics[VAL_LOSS_METRIC] = loss
        if evaluation.is_last(step, name) and self.final_summary is None:
            summary = self.trainer.final_model(functools.partial(evaluation.train_batches, device=device))
            if summary is not None:
                self.final_summary = dict(summary)
                metrics.update(scalar_metrics(summary))
                metrics[FINAL_MODEL_KEY] = 1.0
        return metrics

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with self.trainer.autocast():  # the run's precision hparam, as in training
            return self.network(x).float()

    def __deepcopy__(self, memo: dict[int, Any]) -> DGQuantAlgorithm:
        """A rebuilt algorithm holding a copy of this one's weights (the plugin host cannot be
        copied; the optimizer state is not carried over). SWAD-style averaging deep-copies."""
        clone = type(self)(*copy.deepcopy(self._init_args, memo))
        clone.load_state_dict(self.state_dict())
        clone.to(next(self.parameters()).device)
        return clone.train(self.training)


def algorithm_classes(
    specs: list[AlgorithmSpec], algorithm_base: type, networks: ModuleType, module: str, total_steps: int | None = None
) -> dict[str, type]:
    """One class per spec deriving from DomainBed's ``algorithm_base``, named as in ``module``."""
    classes = {}
    package = module.rsplit(".", 1)[0]
    for spec in specs:
        namespace = {
            "__doc__": spec.doc,
            "__module__": module,
            "__qualname__": spec.name,
            "PLUGINS": spec.plugins,
            "networks": networks,
            "PACKAGE": package,
            "TOTAL_STEPS": total_steps,
            "ATTACHABLE": spec.attachable,
        }
        classes[spec.name] = type(spec.name, (DGQuantAlgorithm, algorithm_base), namespace)
    return classes


def hparam_table(specs: list[AlgorithmSpec]) -> dict[str, dict[str, HParam | DatasetHParam]]:
    """``{algorithm: {hparam: HParam}}`` for ``extend_registry``."""
    return {spec.name: plugin_hparams(spec.plugins, spec.hparams) for spec in specs}
