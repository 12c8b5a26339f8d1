"""``quantize_``: attach fake quantizers to a model in place, and switch them on or off.

Weights are quantized through ``torch.nn.utils.parametrize`` rather than by swapping module
classes: it works for any module that holds a weight tensor (convolutions, linears, and the
fused input projection of ``nn.MultiheadAttention`` that CLIP uses), and the original
``nn.Parameter`` objects stay in place, so an optimizer built before or after ``quantize_`` keeps
training them. Input activations are quantized by a forward pre-hook whose quantizer is a
submodule (``act_quantizer``), so it is saved in the ``state_dict``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from dg_quant.errors import ConfigError
from dg_quant.quant import fused
from dg_quant.quant.config import LSQConfig, QuantConfig
from dg_quant.quant.inq import iter_inq_layers
from dg_quant.quant.lsq import LSQQuantizer
from dg_quant.quant.mha import QuantizableMHA

# Module type -> names of the weight tensors to quantize. Subclasses match too
# (``NonDynamicallyQuantizableLinear`` is an ``nn.Linear``).
QUANTIZABLE_WEIGHTS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Conv1d: ("weight",),
    nn.Conv2d: ("weight",),
    nn.Conv3d: ("weight",),
    nn.Linear: ("weight",),
    nn.MultiheadAttention: ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"),
}

ACT_QUANTIZER = "act_quantizer"


def weight_names(module: nn.Module) -> tuple[str, ...]:
    """Names of the quantizable weight tensors that ``module`` actually holds."""
    for cls, names in QUANTIZABLE_WEIGHTS.items():
        if isinstance(module, cls):
            return tuple(n for n in names if _has_tensor(module, n))
    return ()


def _has_tensor(module: nn.Module, name: str) -> bool:
    if parametrize.is_parametrized(module, name):
        return True
    return isinstance(getattr(module, name, None), torch.Tensor)


def quantizable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module with a quantizable weight, by ``named_modules()`` name, in model order."""
    return {name: m for name, m in model.named_modules() if weight_names(m)}


def find_head(model: nn.Module, config: QuantConfig) -> str | None:
    """The classifier's module name: ``config.head``, else the last ``nn.Linear``."""
    modules = dict(model.named_modules())
    if config.head is not None:
        if config.head not in modules:
            raise ConfigError(f"head {config.head!r} is not a module of the model; pick one of its named_modules()")
        return config.head
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def plan(model: nn.Module, config: QuantConfig) -> dict[str, tuple[bool, bool]]:
    """Decide, per module name, whether its (weights, input activations) are quantized."""
    candidates = quantizable_modules(model)
    head = find_head(model, config)
    first = next(iter(candidates), None)
    decisions: dict[str, tuple[bool, bool]] = {}
    for name in candidates:
        if config.include and not any(fnmatch.fnmatchcase(name, p) for p in config.include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
            continue
        if name == head and not config.quantize_head:
            continue
        weights, acts = config.weight is not None, config.activation is not None
        if name == first and config.first_layer == "fp":
            continue
        if name == first and config.first_layer == "activations_only":
            weights, acts = False, True
        decisions[name] = (weights, acts)
    return decisions


def _act_pre_hook(module: nn.Module, args: tuple) -> tuple | None:
    quantizer = getattr(module, ACT_QUANTIZER)
    if not quantizer.enabled or not args or not isinstance(args[0], torch.Tensor):
        return None
    first = args[0]
    q = quantizer(first)
    # Attention called as attn(x, x, x): quantize the shared input once.
    return tuple(q if a is first else a for a in args)


def quantize_(
    model: nn.Module,
    config: QuantConfig | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Attach LSQ fake quantizers to ``model`` in place, following ``config``; returns ``model``.

    ``filter_fn(module, name)`` can veto modules on top of the config's patterns.
    Call it before building the optimizer so that the step sizes are trained; with
    ``config.enabled=False`` the model computes in full precision until ``set_quantization``.
    """
    config = config or QuantConfig()
    decisions = plan(model, config)
    modules = dict(model.named_modules())
    act_config = config.activation
    if act_config is not None and act_config.granularity != "per_tensor":
        raise ConfigError("activation quantizers are per tensor: set activation granularity='per_tensor'")
    if act_config is not None:
        _call_quantized_out_projections(modules, decisions)
    for name, (weights, acts) in decisions.items():
        module = modules[name]
        if filter_fn is not None and not filter_fn(module, name):
            continue
        if weights:
            for tensor_name in weight_names(module):
                if parametrize.is_parametrized(module, tensor_name):
                    raise ConfigError(f"{name}.{tensor_name} is already quantized; call quantize_ once per model")
                weight = getattr(module, tensor_name)
                quantizer = _weight_quantizer(config.weight, weight, switched_on=config.enabled)
                quantizer.enabled = config.enabled
                parametrize.register_parametrization(module, tensor_name, quantizer)
                fused.install(module)  # conv/linear: keep no fake-quantized weight for backward
        if acts and act_config is not None and not hasattr(module, ACT_QUANTIZER):
            act = LSQQuantizer(act_config, (1,), is_weight=False).to(_device_of(module))
            act.enabled = config.enabled
            setattr(module, ACT_QUANTIZER, act)
            module.register_forward_pre_hook(_act_pre_hook)
    return model


def _call_quantized_out_projections(modules: dict[str, nn.Module], decisions: dict[str, tuple[bool, bool]]) -> None:
    """Attention layers read ``out_proj.weight`` without calling ``out_proj``; where that module is
    to get an activation quantizer, make the attention a ``QuantizableMHA``, which calls it (before
    parametrization, which subclasses the module's class)."""
    for name, module in modules.items():
        if (
            type(module) is nn.MultiheadAttention
            and decisions.get(f"{name}.out_proj" if name else "out_proj", (False, False))[1]
        ):
            module.__class__ = QuantizableMHA


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _weight_quantizer(cfg: LSQConfig, weight: torch.Tensor, switched_on: bool = True) -> LSQQuantizer:
    shape = (weight.shape[0],) + (1,) * (weight.dim() - 1) if cfg.granularity == "per_channel" else (1,)
    quantizer = LSQQuantizer(cfg, shape, is_weight=True).to(device=weight.device, dtype=weight.dtype)
    if cfg.mode == "auto":
        raise ConfigError("weight quantizers need an explicit mode (signed or symmetric), not 'auto'")
    # Switched off, the step is re-initialised at the switch: the cheap LSQ rule holds its place.
    quantizer.initialize(weight, method=None if switched_on else "lsq")
    return quantizer


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, LSQQuantizer]]:
    """Every quantizer in ``model`` with its module name (``...parametrizations.weight.0``)."""
    for name, module in model.named_modules():
        if isinstance(module, LSQQuantizer):
            yield name, module


def iter_quantized_weights(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, LSQQuantizer]]:
    """(module name, module, tensor name, quantizer) for every quantized weight tensor."""
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, LSQQuantizer):
                    yield name, module, tensor_name, p


def latent_weight(module: nn.Module, tensor_name: str) -> nn.Parameter:
    """The trained full-precision tensor behind a quantized weight."""
    return module.parametrizations[tensor_name].original


def step_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All learnable step sizes (LSQ ``s``) of the model."""
    return [q.step for _, q in iter_quantizers(model)]


@torch.no_grad()
def set_quantization(model: nn.Module, enabled: bool, *, reinit: bool = True) -> int:
    """Switch every quantizer on or off; returns how many were switched.

    With ``reinit`` a weight step is re-initialised from the current weights when switched on
    (they have moved since ``quantize_``) and activation steps re-initialise on the next batch.
    """
    count = 0
    for _, module, tensor_name, q in iter_quantized_weights(model):
        if enabled and not q.enabled and reinit:
            q.initialize(latent_weight(module, tensor_name))
        q.enabled = enabled
        count += 1
    for module in model.modules():
        act = getattr(module, ACT_QUANTIZER, None)
        if isinstance(act, LSQQuantizer):
            if enabled and not act.enabled and reinit:
                act.initialized = False
            act.enabled = enabled
            count += 1
    return count


def set_compiled_kernels(model: nn.Module, enabled: bool = True) -> int:
    """Route every quantizer through the fused ``torch.compile`` kernels (or back to eager).

    An opt-in for eager training loops: same forward values and input gradients, 2-3x less
    quantizer time on CPU; the first step compiles. Not needed when the whole model is compiled.
    Returns how many quantizers were switched.
    """
    count = 0
    for _, q in iter_quantizers(model):
        q.compiled = enabled
        count += 1
    return count


def set_fused_layers(model: nn.Module, enabled: bool = True) -> int:
    """Run weight-quantized convs/linears as fused layers (the default) or through the parametrization.

    Both compute the same numbers; the fused layer keeps no fake-quantized weight for backward
    (``dg_quant.quant.fused``). Off is the reference path (tests, benchmarks). Returns how many
    weight quantizers were switched.
    """
    count = 0
    for _, _, _, q in iter_quantized_weights(model):
        q.fused_layer = enabled
        count += 1
    return count


@torch.no_grad()
def clamp_steps_(model: nn.Module, minimum: float = 1e-8) -> None:
    """Keep step sizes positive after an optimizer update (a negative step flips signs)."""
    steps = step_parameters(model)
    if steps:  # one fused launch per device and dtype instead of one kernel per quantizer
        torch._foreach_clamp_min_(steps, minimum)


def is_quantization_enabled(model: nn.Module) -> bool:
    """True if any quantizer of the model is on."""
    return any(q.enabled for _, q in iter_quantizers(model))


def is_quantized(model: nn.Module) -> bool:
    """True if the model computes with quantized weights: a quantizer is on, or the model holds
    INQ weights and every one of them is frozen on its power-of-two levels (INQ has no quantizer
    modules, so ``is_quantization_enabled`` cannot see it)."""
    if is_quantization_enabled(model):
        return True
    layers = list(iter_inq_layers(model))
    return bool(layers) and all(bool(layer.frozen.all()) for layer in layers)


@torch.no_grad()
def bake_(model: nn.Module) -> nn.Module:
    """Replace every quantized weight by its fake-quantized value and drop the quantizers.

    The result is a plain float model whose weights lie on the quantization grid (what an
    inference engine would compute with); activation quantizers are left in place.
    """
    for _, module, tensor_name, _q in list(iter_quantized_weights(model)):
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return model
