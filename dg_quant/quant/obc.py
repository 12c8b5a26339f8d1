"""OBC/OBQ post-training quantization (Frantar & Alistarh, NeurIPS 2022; docs/methods.md 5) and its driver.

``OBQ`` is the exact greedy solver: per row, quantize the weight whose rounding costs least
(e_j / [H^-1]_jj), let the free weights absorb the error through H^-1, drop that column from
H^-1, repeat. It costs O(rows * cols^3), so ``ptq_`` uses it for layers with at most
``obq_max_cols`` inputs and GPTQ's lazy-batch Cholesky variant above that.

``ptq_(model, calibration, config)`` quantizes a trained full-precision model in place: Hessians
from calibration inputs (source-domain training images only; the caller supplies them), the
solver layer by layer, optional BatchNorm re-estimation, and finally LSQ weight quantizers
holding the solved grid, so that the compression report and ``export`` treat the result like
a QAT model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from dg_quant.errors import ConfigError
from dg_quant.quant.api import plan, quantize_
from dg_quant.quant.config import MAX_BITS, MIN_BITS, LSQConfig, QuantConfig
from dg_quant.quant.gptq import GPTQ, LayerResult, LayerSolver, inverse_hessian, solver_weight
from dg_quant.quant.lsq import LSQQuantizer

log = logging.getLogger(__name__)

METHODS = ("obc", "gptq")
Calibration = Callable[[], Iterable[torch.Tensor]]
OBQ_CHUNK_ELEMENTS = 1 << 22  # H^-1 copies (rows * cols^2 values) solved together


class OBQ(LayerSolver):
    """Exact greedy OBQ, rows in parallel, each with its own copy of (its group's) H^-1.

    At least ``parallel`` rows go together, more when H^-1 is small (a depthwise layer's 9x9),
    so that a 960-channel depthwise conv is one batch of 9 steps rather than 30. Rows never
    interact, so the batching does not change the result.
    """

    method = "obq"

    def __init__(self, layer: nn.Module, bits: int, name: str = "", damp: float = 0.01, parallel: int = 32) -> None:
        super().__init__(layer, bits, name, damp)
        self.parallel = parallel

    def _solve(self, W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        cols = W.shape[-1]
        Hinv0 = inverse_hessian(H, self.name).reshape(-1, cols, cols)  # [groups, cols, cols]
        rows = W.reshape(-1, cols)
        group = torch.arange(rows.shape[0], device=W.device) // W.shape[-2]
        step = self.step.unsqueeze(1)
        Q = rows.clone()
        chunk = max(self.parallel, OBQ_CHUNK_ELEMENTS // cols**2)
        for r1 in range(0, rows.shape[0], chunk):
            r2 = min(r1 + chunk, rows.shape[0])
            Q[r1:r2] = self._solve_rows(rows[r1:r2].clone(), Hinv0[group[r1:r2]], step[r1:r2])
        return Q.reshape(W.shape)

    def _solve_rows(self, w: torch.Tensor, Hinv: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Rows ``w`` [rows, cols], each with its own H^-1 in ``Hinv`` [rows, cols, cols] (updated in place)."""
        rows, cols = w.shape
        done = torch.zeros_like(w, dtype=torch.bool)
        idx = torch.arange(rows, device=w.device)
        for _ in range(cols):
            q = self.fake_quant(w, step)
            err = (q - w) ** 2
            diag = Hinv.diagonal(dim1=1, dim2=2)
            score = (err / diag.clamp_min(1e-30)).masked_fill(done, float("inf"))
            j = score.argmin(dim=1)
            # A weight pushed outside the grid by earlier updates goes first (largest error).
            drift = ((err > step**2 / 4 * (1 + 1e-9)) & ~done).any(dim=1)
            if drift.any():
                j = torch.where(drift, err.masked_fill(done, -1.0).argmax(dim=1), j)
            qj, wj, d = q[idx, j], w[idx, j], Hinv[idx, j, j]
            col = Hinv[idx, :, j]
            w -= col * ((wj - qj) / d).unsqueeze(1)
            w[idx, j] = qj
            Hinv -= col.unsqueeze(2) * (Hinv[idx, j, :] / d.unsqueeze(1)).unsqueeze(1)
            done[idx, j] = True
        return w


@dataclass
class PTQConfig:
    """How ``ptq_`` quantizes (docs/methods.md 5.4).

    ``method``: ``obc`` (exact OBQ for layers with <= ``obq_max_cols`` inputs, GPTQ above; all
    Hessians from the full-precision model) or ``gptq`` (GPTQ everywhere, layers in order with
    each Hessian taken through the already quantized prefix). ``sequential`` overrides that order.
    """

    method: str = "obc"
    bits: int = 7
    obq_max_cols: int = 256
    damp: float = 0.01
    blocksize: int = 128
    act_order: bool = False
    sequential: bool | None = None
    quantize_head: bool = False
    first_layer_fp: bool = False
    bn_reestimate: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"PTQ method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if isinstance(self.bits, bool) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}; got {self.bits!r}")
        if self.damp < 0:
            raise ConfigError(f"damp must be >= 0; got {self.damp}")

    @property
    def is_sequential(self) -> bool:
        return self.method == "gptq" if self.sequential is None else self.sequential


def ptq_layers(model: nn.Module, config: PTQConfig) -> dict[str, nn.Module]:
    """The Conv2d/Linear layers the policy quantizes (head FP unless asked; grouped convs included)."""
    policy = QuantConfig(
        weight=LSQConfig(bits=config.bits),
        quantize_head=config.quantize_head,
        first_layer="fp" if config.first_layer_fp else "full",
    )
    modules = dict(model.named_modules())
    layers = {}
    for name, (weights, _acts) in plan(model, policy).items():
        module = modules[name]
        if not weights or not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        if any(q.enabled for q in _weight_quantizers(module)):
            raise ConfigError(f"{name} is already quantized; PTQ needs a full-precision model (no QAT plugin)")
        layers[name] = module
    if not layers:
        raise ConfigError("PTQ found no Conv2d/Linear layer to quantize in this model")
    return layers


def _weight_quantizers(module: nn.Module) -> list[LSQQuantizer]:
    if not parametrize.is_parametrized(module, "weight"):
        return []
    return [p for p in module.parametrizations.weight if isinstance(p, LSQQuantizer)]


def make_solver(name: str, layer: nn.Module, config: PTQConfig) -> LayerSolver:
    cols = solver_weight(layer)[0].numel()
    if config.method == "obc" and cols <= config.obq_max_cols:
        return OBQ(layer, config.bits, name, config.damp)
    return GPTQ(layer, config.bits, name, config.damp, config.blocksize, config.act_order)


class _StopForward(Exception):
    """Raised by a hook to skip the rest of a calibration forward pass."""


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _collect(model: nn.Module, solvers: dict[str, LayerSolver], calibration: Calibration, stop: bool) -> None:
    """Run the calibration batches, feeding each solver its layer's inputs."""

    def hook_for(solver: LayerSolver):
        def hook(_module, inp, out):
            solver.add_batch(inp[0], out)
            if stop:
                raise _StopForward

        return hook

    handles = [s.layer.register_forward_hook(hook_for(s)) for s in solvers.values()]
    device = _device(model)
    try:
        for x in calibration():
            try:
                model(x.to(device) if isinstance(x, torch.Tensor) else x)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def reestimate_bn(model: nn.Module, calibration: Calibration) -> int:
    """Recompute BatchNorm running statistics as a plain average over the calibration batches."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    saved = [(m, m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    device = _device(model)
    try:
        for x in calibration():
            model(x.to(device) if isinstance(x, torch.Tensor) else x)
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
    return len(bns)


def ptq_(model: nn.Module, calibration: Calibration, config: PTQConfig | None = None) -> list[LayerResult]:
    """Quantize ``model``'s weights in place from calibration inputs; per-layer errors vs RTN.

    ``calibration()`` returns a fresh iterable of input batches each time it is called (source
    training data only). Afterwards each layer holds an LSQ weight quantizer on the solved grid.
    """
    config = config or PTQConfig()
    was_training = model.training
    model.eval()
    layers = ptq_layers(model, config)
    results: list[LayerResult] = []
    steps: dict[str, torch.Tensor] = {}
    start = time.monotonic()

    def done(solver: LayerSolver) -> None:  # one progress line per layer (minutes on a ResNet-50)
        r = solver.quantize()
        results.append(r)
        steps[r.name] = solver.step
        solver.free()
        log.info(
            "ptq %d/%d %s %s: error %.4g (RTN %.4g), %.0f s",
            len(results),
            len(layers),
            r.name,
            r.method,
            r.error,
            r.rtn_error,
            time.monotonic() - start,
        )

    try:
        if config.is_sequential:
            for name, layer in layers.items():
                solver = make_solver(name, layer, config)
                _collect(model, {name: solver}, calibration, stop=True)
                done(solver)
        else:
            solvers = {name: make_solver(name, layer, config) for name, layer in layers.items()}
            log.info("ptq: collecting the inputs of %d layers", len(solvers))
            _collect(model, solvers, calibration, stop=False)
            for solver in solvers.values():
                done(solver)
        if config.bn_reestimate:
            reestimate_bn(model, calibration)
    finally:
        model.train(was_training)
    _attach_quantizers(model, steps, config.bits)
    return results


def ptq_quant_config(bits: int, enabled: bool = True) -> QuantConfig:
    """The LSQ weight quantizers that hold a PTQ result: signed, per output channel."""
    weight = LSQConfig(bits=bits, mode="signed", granularity="per_channel")
    return QuantConfig(weight=weight, quantize_head=True, enabled=enabled)


def attach_disabled_quantizers(model: nn.Module, config: PTQConfig) -> list[str]:
    """Give the PTQ layers quantizers that stay off until ``ptq_``, so checkpoints keep one layout."""
    names = set(ptq_layers(model, config))
    names = {n for n in names if not _weight_quantizers(dict(model.named_modules())[n])}
    quantize_(model, ptq_quant_config(config.bits, enabled=False), filter_fn=lambda _m, n: n in names)
    return sorted(names)


@torch.no_grad()
def _attach_quantizers(model: nn.Module, steps: dict[str, torch.Tensor], bits: int) -> None:
    """Hold the solved grid in LSQ quantizers (the weights already lie on it, so outputs are unchanged)."""
    modules = dict(model.named_modules())
    fresh = {n for n in steps if not _weight_quantizers(modules[n])}
    quantize_(model, ptq_quant_config(bits), filter_fn=lambda _m, n: n in fresh)
    for name in steps:
        for q in _weight_quantizers(modules[name]):
            if q.bits != bits or q.step.numel() != steps[name].numel():
                raise ConfigError(f"{name} carries a {q.bits}-bit quantizer that cannot hold a {bits}-bit PTQ grid")
            q.step.copy_(steps[name].reshape(q.step.shape).to(q.step.dtype))
            q.initialized = True
            q.enabled = True


def summarize(results: list[LayerResult]) -> dict[str, float]:
    """Flat totals for result files: summed and mean relative errors of the solver and of RTN."""
    n = max(len(results), 1)
    return {
        "ptq/layers": len(results),
        "ptq/error": sum(r.error for r in results),
        "ptq/rtn_error": sum(r.rtn_error for r in results),
        "ptq/relative_error_mean": sum(r.relative_error for r in results) / n,
        "ptq/relative_rtn_error_mean": sum(r.relative_rtn_error for r in results) / n,
        "ptq/layers_better_than_rtn": sum(r.error <= r.rtn_error for r in results),
    }
