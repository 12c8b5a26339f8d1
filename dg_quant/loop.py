"""The host-neutral training step: a plain optimizer step with the plugin hooks around it.

Both hosts drive training through ``Trainer``: ``wilds_run`` calls ``train_step`` per batch and
the DomainBed algorithms call it from ``update``. A method changes training only through hooks.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dg_quant.context import Calibration, RunContext
from dg_quant.host import PluginHost
from dg_quant.options import read_options
from dg_quant.speed import SpeedOptions, autocast, model_device

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class Trainer:
    """Owns one model, its optimizer and the step counter of a run."""

    def __init__(
        self,
        host: PluginHost,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        config: argparse.Namespace,
        scheduler: Any | None = None,
    ) -> None:
        self.host, self.model, self.optimizer = host, model, optimizer
        self.loss_fn, self.config, self.scheduler = loss_fn, config, scheduler
        self.precision = read_options(SpeedOptions, config).precision
        self.step = 0
        # The module the gradient passes run through: the model, or a data-parallel wrapper of it
        # (DistributedDataParallel averages the gradients of every backward over the processes).
        # Every other hook, the state and evaluation see the model itself.
        self.forward_model: nn.Module = model

    @property
    def context(self) -> RunContext:
        """The run as its host set it up (``PluginHost.configure``)."""
        return self.host.context

    @classmethod
    def build(
        cls,
        host: PluginHost,
        model: nn.Module,
        config: argparse.Namespace,
        make_optimizer: OptimizerFactory,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    ) -> Trainer:
        """Let plugins configure the model, then build the optimizer, then let them adjust it."""
        host.hook.dgq_configure_model(model=model, config=config, context=host.context)
        optimizer = make_optimizer(model)
        host.hook.dgq_configure_optimizer(optimizer=optimizer, model=model, config=config, context=host.context)
        scheduler = make_scheduler(optimizer) if make_scheduler else None
        return cls(host, model, optimizer, loss_fn, config, scheduler)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's forward precision (``--precision``), on the model's current device.

        Evaluation code wraps its forward passes in it too, so that a bf16 run is scored as trained.
        """
        return autocast(model_device(self.model), self.precision)

    def _kwargs(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "step": self.step,
            "config": self.config,
            "context": self.context,
        }

    def train_step(self, batch: tuple[Any, torch.Tensor], domains: torch.Tensor | None = None) -> dict[str, Any]:
        """Run one step on ``(x, y)`` (already on the device); returns the step's metrics.

        :param domains: each sample's domain label (``[B]``), for plugins that use them (CORAL,
            MixStyle's cross-domain mixing); None when the host does not know them.
        """
        hook = self.host.hook
        self.model.train()
        hook.dgq_step_start(domains=domains, **self._kwargs())
        self.optimizer.zero_grad(set_to_none=True)
        terms: dict[str, torch.Tensor] = {}
        # The methods' forward passes and their backward run under autocast (backward ops keep the
        # dtypes of their forward); parameters and gradients stay fp32.
        with self.autocast(), self._loss_with_terms(domains, terms) as loss_fn:
            metrics = hook.dgq_compute_gradients(
                batch=batch, loss_fn=loss_fn, **{**self._kwargs(), "model": self.forward_model}
            )
        metrics.update(terms)
        hook.dgq_after_backward(**self._kwargs())
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        hook.dgq_after_step(metrics=metrics, **self._kwargs())
        self.step += 1
        return metrics

    @contextlib.contextmanager
    def _loss_with_terms(
        self, domains: torch.Tensor | None, terms: dict[str, torch.Tensor]
    ) -> Iterator[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """The step's ``loss_fn``: the task loss plus the plugins' ``dgq_loss_terms``.

        Without such plugins it is the host's own ``loss_fn``. With them, the classifier's input is
        captured at each forward pass of the block (a pre-hook), so whichever plugin computes the
        gradients, every pass it scores gets the terms of its own features.
        """
        hook = self.host.hook.dgq_loss_terms
        if not hook.get_hookimpls():
            yield self.loss_fn
            return
        captured: dict[str, torch.Tensor] = {}
        head = getattr(self.model, "classifier", None)
        handle = (
            head.register_forward_pre_hook(lambda _m, args: captured.__setitem__("features", args[0]))
            if isinstance(head, nn.Module)
            else None
        )

        def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            features = captured.get("features")
            same = features is not None and len(features) == len(y)
            labels = domains if domains is not None and len(domains) == len(y) else None
            loss = self.loss_fn(logits, y)
            for result in hook(
                model=self.model,
                features=features if same else None,
                logits=logits,
                y=y,
                domains=labels,
                step=self.step,
                config=self.config,
                context=self.context,
            ):
                for name, value in (result or {}).items():
                    loss = loss + value
                    terms.setdefault(name, value.detach())
            return loss

        try:
            yield loss_fn
        finally:
            if handle is not None:
                handle.remove()

    def evaluation_extras(self) -> dict[str, Any]:
        """What the plugins add to an evaluation record (compression, frozen layers, ...)."""
        extras: dict[str, Any] = {}
        results = self.host.hook.dgq_evaluate(
            model=self.model, step=self.step, config=self.config, context=self.context
        )
        for result in results:
            extras.update(result or {})
        return extras

    def evaluated(self, record: dict[str, Any]) -> None:
        """Hand a finished evaluation record of the trained model to the plugins (``dgq_evaluated``)."""
        self.host.hook.dgq_evaluated(
            model=self.model, step=self.step, record=record, config=self.config, context=self.context
        )

    def final_model(self, train_batches: Callable[[int], Iterable[Any]]) -> dict[str, Any] | None:
        """Let a plugin replace the trained weights by the run's final model (SWAD's average).

        Returns its summary, or None when the trained model stays the run's model. Hosts call it
        after the last step and before ``end()``, and report the model as the run's if it returns one.
        """
        return self.host.hook.dgq_final_model(
            model=self.model, train_batches=train_batches, config=self.config, context=self.context
        )

    def end(self, log_dir: str | None, calibration: Calibration | None = None) -> TrainEnd:
        """The end of training (``end_training``) of this run's model."""
        return end_training(self.host, self.model, self.config, log_dir, calibration)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: weights, optimizer, step and each plugin's state."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "plugins": self.plugin_state_dict(),
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output; a checkpoint without ``plugins`` (older runs) loads too."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.load_plugin_state_dict(state.get("plugins", {}))

    def plugin_state_dict(self) -> dict[str, Any]:
        """``{registered name: state}`` of every ``Stateful`` plugin object that has state."""
        states = {name: obj.state_dict() for name, obj in self.host.stateful.items()}
        return {name: state for name, state in states.items() if state is not None}

    def load_plugin_state_dict(self, states: dict[str, Any]) -> None:
        """Hand each ``Stateful`` plugin object its own entry of ``plugin_state_dict()``."""
        unknown = sorted(set(states) - set(self.host.stateful))
        if unknown:
            warnings.warn(
                f"the checkpoint holds state of plugins this run does not load: {', '.join(unknown)}; ignored",
                stacklevel=2,
            )
        for name, obj in self.host.stateful.items():
            if name in states:
                obj.load_state_dict(states[name])


@dataclass(frozen=True)
class TrainEnd:
    """What the end of training did: the hooks' merged numbers and whether they changed the model."""

    numbers: dict[str, Any]
    model_changed: bool


def end_training(
    host: PluginHost,
    model: nn.Module,
    config: argparse.Namespace,
    log_dir: str | None,
    calibration: Calibration | None,
) -> TrainEnd:
    """The one end-of-training sequence of every host: snapshot the model, run ``dgq_train_end``
    (post-training quantization, summaries) with the host's calibration data, and compare.

    A host whose model changed (``model_changed``) scores and saves the changed model: the last
    results must describe the model that is stored. ``wilds_run``, ``dgq_ptq`` (a saved run
    rebuilt with ``dg_quant.obc``) and the DomainBed launcher all end through here.
    """
    before = state_snapshot(model)
    merged: dict[str, Any] = {}
    results = host.hook.dgq_train_end(
        model=model, config=config, log_dir=log_dir, context=host.context, calibration=calibration
    )
    for result in results:
        merged.update(result or {})
    return TrainEnd(merged, not same_state(before, state_snapshot(model)))


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Turn tensors into floats (done at logging time, not every step, to avoid GPU syncs)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = float(value.item())
        elif isinstance(value, int | float | bool):
            out[key] = float(value)
    return out


def state_snapshot(model: nn.Module) -> dict[str, Any]:
    """A copy of the model's state (tensors and extra state such as quantizer flags), to tell
    afterwards whether end-of-training hooks (post-training quantization) changed the model."""
    return copy.deepcopy({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()})


def same_state(a: Any, b: Any) -> bool:
    """Equality through dicts and lists of tensors (``==`` on such containers is ambiguous)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return bool(a == b)
