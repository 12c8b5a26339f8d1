"""The PyTorch route: a trained model's linear layers as torchao int8 tensors with the learned steps.

torchao's ``Int8Tensor`` holds int8 codes and per-row scales and dispatches ``F.linear`` to its
integer path. Built from the LSQ steps (``Int8Tensor.from_hp(code * step, PerRow(), scale=step)``),
its codes are the fake-quant model's, so a weight-only model computes the same linear layers
without dg-quant's quantizers. With ``activations="dynamic"`` the input of each converted layer
is quantized to int8 per row at run time (torchao's dynamic activation quantization) instead of
with the learned activation step: faster int8 x int8 matmuls, different numbers. With
``activations="learned"`` the learned activation quantizers stay in front of the layers, as
quantize-dequantize steps, and the outputs match the fake-quant model.

Only ``nn.Linear`` layers (transformer blocks, classifier heads) are converted: torchao's int8
tensors have no convolution kernels, so a CNN's quantized convolutions are baked to float
weights on their grid (``code * step``). Needs ``pip install 'dg-quant[torchao]'``.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from dg_quant.deploy.qdq import IntegerWeight, QuantizeDequantize, integer_model
from dg_quant.errors import ConfigError, require_optional
from dg_quant.quant.api import ACT_QUANTIZER

Activations = Literal["learned", "dynamic", "none"]


def to_torchao(model: nn.Module, activations: Activations | None = None) -> tuple[nn.Module, list[str]]:
    """A float32 eval copy of ``model`` whose LSQ-quantized ``nn.Linear`` weights are torchao
    ``Int8Tensor``s; returns (model, names of the converted layers).

    ``activations``: ``learned`` keeps the model's activation quantizers (same numbers as the
    fake-quant model), ``dynamic`` replaces them, on converted layers, by torchao's per-row
    dynamic int8 quantization, ``none`` drops them there. Default: ``dynamic`` if the model
    quantizes activations, else ``learned`` (nothing to keep).
    """
    ao = require_optional("torchao.quantization")
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import QuantizeTensorToInt8Kwargs

    converted, _plan = integer_model(model)
    has_acts = any(isinstance(getattr(m, ACT_QUANTIZER, None), QuantizeDequantize) for m in converted.modules())
    mode = activations or ("dynamic" if has_acts else "learned")
    if mode not in ("learned", "dynamic", "none"):
        raise ConfigError(f"activations must be learned, dynamic or none; got {mode!r}")
    names = []
    for name, module in list(converted.named_modules()):
        chain = getattr(getattr(module, "parametrizations", None), "weight", None)
        if not isinstance(module, nn.Linear) or chain is None or not isinstance(chain[0], IntegerWeight):
            continue
        codes, scale = chain[0].codes, chain[0].scale
        rows = scale.reshape(-1, 1).expand(codes.shape[0], 1).contiguous()
        kwargs = {"act_quant_kwargs": QuantizeTensorToInt8Kwargs(granularity=ao.PerRow())} if mode == "dynamic" else {}
        weight = ao.Int8Tensor.from_hp(codes.to(torch.float32) * rows, ao.PerRow(), scale=rows, **kwargs)
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        plain.weight = nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            plain.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        act = getattr(module, ACT_QUANTIZER, None)
        if isinstance(act, QuantizeDequantize) and mode == "learned":
            q = copy.deepcopy(act)
            plain.register_forward_pre_hook(lambda _m, args, q=q: (q(args[0]), *args[1:]))
        _replace(converted, name, plain)
        names.append(name)
    return converted.eval(), names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
