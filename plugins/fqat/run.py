"""One FQAT run's state and hooks: quantize, SAGM two-pass step, disorder windows, freezing, logs.

``dg_quant.fqat`` registers one ``FQATRun`` per run in ``dgq_configure``. It writes
``fqat_disorder.jsonl`` in ``log_dir``: one row per scale factor and window (``step``, ``scale``,
``kind``, ``disorder``, ``frozen``, ``frozen_fraction``, ``ewgs_delta``), for plots over time.
The open windows, frozen set and log rows travel in the run's checkpoint (``state_dict``, ``dg_quant.host.Stateful``), so
``--resume`` and a reloaded DomainBed ``model.pkl`` go on with the same freezing decisions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dg_quant.context import RunContext
from dg_quant.hookimpl import hookimpl
from dg_quant.io import atomic_write_jsonl
from dg_quant.plugins.fqat.disorder import Window, freeze_mask, observe_all, window_disorder
from dg_quant.plugins.fqat.options import FQATOptions
from dg_quant.plugins.fqat.routing import scale_gradients
from dg_quant.plugins.qat import prepare, switch_on
from dg_quant.quant import (
    LSQQuantizer,
    clamp_steps_,
    is_quantization_enabled,
    iter_quantizers,
    step_parameters,
)
from dg_quant.quant.ewgs import set_fixed_delta_, set_hessian_delta_
from dg_quant.sharpness import combine_all, sagm_gradients

LOG_FILE = "fqat_disorder.jsonl"
DEFAULT_EWGS_EVERY = 1000
EWGS_HESSIAN_BATCH = 16  # samples per Hessian batch, as EWGS's estimate


def hessian_batches(batch: tuple, size: int = EWGS_HESSIAN_BATCH, limit: int = 10) -> list[tuple]:
    """Up to ``limit`` consecutive full batches of ``size`` samples cut from the step's ``(x, y)``.

    EWGS averages its Hessian δ over 10 batches of 16 images from the training data; the hooks
    see one batch per step, so the batches are cut from it (views, no copies, and nothing to keep
    for ``--resume``). Inputs that are not a tensor (or a dict of tensors) stay one batch.
    """
    x, y = batch
    n = x.shape[0] if isinstance(x, torch.Tensor) else None
    if isinstance(x, dict) and x and all(isinstance(v, torch.Tensor) for v in x.values()):
        n = next(iter(x.values())).shape[0]
    if n is None or n <= size:
        return [batch]

    def cut(t: Any, a: int, b: int) -> Any:
        if isinstance(t, dict):
            return {k: v[a:b] for k, v in t.items()}
        return t[a:b] if isinstance(t, torch.Tensor) else t

    starts = range(0, n - size + 1, size)[:limit]  # full batches only (BatchNorm needs samples)
    return [(cut(x, a, a + size), cut(y, a, a + size)) for a in starts]


def scale_label(name: str) -> str:
    """``layer.parametrizations.weight.0`` -> ``layer.weight``; ``layer.act_quantizer`` -> ``layer.act``."""
    return name.replace(".parametrizations.", ".").removesuffix(".0").replace("act_quantizer", "act")


class FQATRun:
    """Per-run FQAT state (windows, frozen masks, log rows) and the hooks that use it."""

    def __init__(self, options: FQATOptions, context: RunContext, start_step: int) -> None:
        self.options, self.start_step = options, start_step
        self.log_dir = Path(context.log_dir) if context.log_dir else None
        # EWGS Hessian δ refresh: the option, else once per epoch, else every DEFAULT_EWGS_EVERY steps
        self.ewgs_every = options.ewgs_update_every or context.steps_per_epoch or DEFAULT_EWGS_EVERY
        self.scales: dict[str, nn.Parameter] = {}  # label -> step parameter
        self.quantizers: dict[str, LSQQuantizer] = {}
        self.kinds: dict[str, str] = {}
        self.windows: dict[str, Window] = {}
        self.frozen: dict[str, torch.Tensor] = {}  # label -> bool mask of the step's shape
        self.deltas: dict[str, float] = {}
        self.rows: list[dict[str, Any]] = []

    # -- set-up -----------------------------------------------------------------------------

    @hookimpl
    def dgq_configure_model(self, model: nn.Module) -> None:
        o = self.options
        prepare(model, o, self.start_step)
        for name, q in iter_quantizers(model):
            label = scale_label(name)
            self.scales[label], self.kinds[label] = q.step, "weight" if q.is_weight else "activation"
            self.quantizers[label] = q
            self.windows[label] = Window()
        if o.quantizer == "ewgs":
            set_fixed_delta_(model, o.ewgs_delta)

    @hookimpl
    def dgq_configure_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        """Give the scale factors their own fixed learning rate when ``--scale_lr`` is set."""
        if self.options.scale_lr is None:
            return
        steps = step_parameters(model)
        ids = {id(p) for p in steps}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        optimizer.add_param_group({"params": steps, "lr": self.options.scale_lr})

    @hookimpl
    def dgq_step_start(self, model: nn.Module, step: int) -> None:
        self._follow_scales()
        if step >= self.start_step and not is_quantization_enabled(model):
            switch_on(model, compat=False)

    # -- the step ---------------------------------------------------------------------------

    @hookimpl
    def dgq_compute_gradients(self, model: nn.Module, batch: tuple, loss_fn: Any, step: int) -> dict[str, Any]:
        o = self.options
        if o.quantizer == "ewgs" and o.ewgs_hessian and is_quantization_enabled(model):
            if step % self.ewgs_every == 0 or not self.deltas:
                deltas = set_hessian_delta_(model, hessian_batches(batch, limit=o.ewgs_hessian_batches), loss_fn)
                self.deltas = {scale_label(n): d for n, d in deltas.items()}
        scale_ids = {id(p) for p in self.scales.values()}
        perturb = None if o.perturb_s else (lambda p: id(p) not in scale_ids)
        result = sagm_gradients(model, batch, loss_fn, o.rho, o.alpha, perturb=perturb)
        grads = {id(p): (g, f) for p, g, f in zip(result.params, result.task, result.flat)}
        labels = list(self.scales)
        pairs = [grads.pop(id(self.scales[label]), (None, None)) for label in labels]
        task, flat = [g for g, _ in pairs], [f for _, f in pairs]
        observe_all([self.windows[label] for label in labels], task, flat, o.disorder_signal)
        routed = scale_gradients(
            task,
            flat,
            [self.frozen.get(label) for label in labels],
            weight=o.combine_weight,
            freeze_mode=o.freeze_mode,
            update_mode=o.update_mode,
            step=step,
        )
        for label, grad in zip(labels, routed):
            self.scales[label].grad = grad
        others = [p for p in result.params if id(p) in grads]
        combined = combine_all([grads[id(p)][0] for p in others], [grads[id(p)][1] for p in others], o.combine_weight)
        for p, grad in zip(others, combined):
            p.grad = grad
        metrics = result.metrics()
        metrics["fqat/frozen_scales"] = float(len(self.frozen))
        return metrics

    @hookimpl
    def dgq_after_step(self, model: nn.Module, step: int) -> None:
        clamp_steps_(model)
        if (step + 1) % self.options.freeze_steps == 0:
            self.close_window(step + 1)

    def close_window(self, steps_done: int) -> None:
        """Compute each scale factor's disorder, choose the frozen set for the next K steps, log it."""
        o = self.options
        for label, s in self.scales.items():
            disorder = window_disorder(self.windows[label], o.disorder_reduce)
            self.windows[label] = Window()
            previous = self.frozen.get(label)
            if disorder is None or o.update_mode == "alternate":
                mask = None
            else:
                mask = freeze_mask(disorder, o.freeze_tau, o.freeze_if).reshape(-1)
                mask = mask.expand(s.numel()).reshape(s.shape) if mask.numel() == 1 else mask.reshape(s.shape)
            if not o.unfreeze and previous is not None:
                mask = previous if mask is None else mask | previous
            if mask is None or not bool(mask.any()):  # keep only real masks: no per-step checks
                self.frozen.pop(label, None)
            else:
                self.frozen[label] = mask
            self.rows.append(
                {
                    "step": steps_done,
                    "scale": label,
                    "kind": self.kinds[label],
                    "disorder": None if disorder is None else float(disorder.float().mean()),
                    "frozen": bool(mask is not None and mask.any()),
                    "frozen_fraction": 0.0 if mask is None else float(mask.float().mean()),
                    "ewgs_delta": self.deltas.get(label),
                }
            )

    # -- observability and resume -------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Frozen scale factors now (any entry frozen) and the mean disorder of the last window."""
        n_frozen, n_scales = len(self.frozen), len(self.scales)
        last = [r["disorder"] for r in self.rows[-n_scales:] if r["disorder"] is not None] if self.rows else []
        return {
            "fqat/frozen_layers": float(n_frozen),
            "fqat/scale_factors": float(n_scales),
            "fqat/frozen_fraction": n_frozen / max(n_scales, 1),
            "fqat/mean_disorder": sum(last) / len(last) if last else None,
        }

    @hookimpl
    def dgq_evaluate(self) -> dict[str, Any]:
        self._save()
        return self.summary()

    @hookimpl
    def dgq_train_end(self, log_dir: str | None) -> dict[str, Any]:
        if log_dir is not None:
            atomic_write_jsonl(Path(log_dir) / LOG_FILE, self.rows)
        return self.summary()

    def _save(self) -> None:
        if self.log_dir is not None:
            atomic_write_jsonl(self.log_dir / LOG_FILE, self.rows)

    def state_dict(self) -> dict[str, Any]:
        """Open windows, frozen masks, EWGS deltas and log rows: plain tensors and containers."""
        return {
            "frozen": dict(self.frozen),
            "deltas": dict(self.deltas),
            "rows": list(self.rows),
            "windows": {k: w.state_dict() for k, w in self.windows.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frozen = dict(state["frozen"])
        self.windows = {k: Window.from_state(w) for k, w in state["windows"].items()}
        self.deltas, self.rows = dict(state["deltas"]), list(state["rows"])
        for label, delta in self.deltas.items():
            self.quantizers[label].ewgs_delta = delta
        self._follow_scales()

    def _follow_scales(self) -> None:
        """Keep masks and windows on the scale factors' device (a checkpoint loaded on the CPU, or a
        DomainBed algorithm moved with ``.to()`` after ``load_state_dict``)."""
        if not self.quantizers:
            return
        device = next(iter(self.quantizers.values())).step.device
        if all(m.device == device for m in self.frozen.values()) and all(
            _window_device(w) in (None, device) for w in self.windows.values()
        ):
            return
        self.frozen = {k: m.to(device) for k, m in self.frozen.items()}
        self.windows = {k: _window_to(w, device) for k, w in self.windows.items()}


def _window_device(window: Window) -> torch.device | None:
    tensor = window.events if window.events is not None else window.previous
    return None if tensor is None else tensor.device


def _window_to(window: Window, device: torch.device) -> Window:
    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    return Window(move(window.previous), move(window.events), window.pairs)
