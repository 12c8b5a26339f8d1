"""The PyTorch route: a trained model's linear layers as torchao int8 tensors with the learned steps.

torchao's ``Int8Tensor`` holds int8 codes and per-row scales and dispatches ``F.linear`` to its
integer path. Built from the LSQ steps (``Int8Tensor.from_hp(code * step, PerRow(), scale=step)``),
its codes are the fake-quant model's, so a weight-only model computes the same linear layers
without dg-quant's quantizers. With ``activations="dynamic"`` the input of each converted layer
is quantized to int8 per row at run time (torchao's dynamic activation quantization) instead of
with the learned activation step: faster int8 x int8 matmuls, different numbers. With
``activations="learned"`` the learned activation quantizers stay in front of the layers, as
quantize-dequantize steps, and the outputs match the fake-quant model.

Which layers run on integer kernels (see ``torchao_layers``):

- ``nn.Linear`` (transformer blocks, classifier heads): torchao ``Int8Tensor``; with dynamic
  activations its matmul is an int8 x int8 ``_int_mm``; weight-only it dequantizes per call.
- ``nn.Conv2d``: torchao has no integer convolution kernel on CPU. Its weight becomes an
  ``IntxUnpackedToInt8Tensor`` (int8 codes, the learned bit width as ``target_dtype``, the learned
  steps as scales), which torchao dequantizes at each call and runs as a float convolution:
  the codes are stored as integers (a quarter of the memory of FP32 in ``state_dict``), the
  speed is FP's, and the learned activation quantizers stay in front of it in every mode.

Needs ``pip install 'dg-quant[torchao]'``.
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

    converted, plan = integer_model(model)
    bits = {t.layer: t.bits for t in plan if t.kind == "weight"}
    has_acts = any(isinstance(getattr(m, ACT_QUANTIZER, None), QuantizeDequantize) for m in converted.modules())
    mode = activations or ("dynamic" if has_acts else "learned")
    if mode not in ("learned", "dynamic", "none"):
        raise ConfigError(f"activations must be learned, dynamic or none; got {mode!r}")
    names = []
    for name, module in list(converted.named_modules()):
        chain = getattr(getattr(module, "parametrizations", None), "weight", None)
        if chain is None or not isinstance(chain[0], IntegerWeight):
            continue
        # a plain Conv2d under its parametrization (a subclass with its own forward stays as it is)
        if isinstance(module, nn.Conv2d) and type(module).__bases__[0] is nn.Conv2d:
            _replace(converted, name, _intx_conv(ao, module, chain[0], bits.get(f"{name}.weight", 8)))
            names.append(name)
            continue
        if not isinstance(module, nn.Linear):
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


def _intx_conv(ao, module: nn.Conv2d, weight: IntegerWeight, bits: int) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` with the same settings whose weight is an ``IntxUnpackedToInt8Tensor``
    of the learned codes and steps (per output channel), keeping the layer's activation quantizer."""
    codes, scale = weight.codes, weight.scale
    channels = codes.shape[0]
    scales = scale.reshape(-1).expand(channels).reshape(channels, *([1] * (codes.dim() - 1))).contiguous()
    tensor = ao.IntxUnpackedToInt8Tensor.from_hp(
        codes.to(torch.float32) * scales,
        (1, *codes.shape[1:]),
        getattr(torch, f"int{bits}") if bits < 8 else torch.int8,
        intx_choose_qparams_algorithm=None,
        custom_scale=scales,
        custom_zero_point=torch.zeros_like(scales, dtype=torch.int8),
    )
    plain = nn.Conv2d(
        module.in_channels,
        module.out_channels,
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        module.groups,
        module.bias is not None,
        module.padding_mode,
    )
    plain.weight = nn.Parameter(tensor, requires_grad=False)
    if module.bias is not None:
        plain.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    act = getattr(module, ACT_QUANTIZER, None)
    if isinstance(act, QuantizeDequantize):
        q = copy.deepcopy(act)
        plain.register_forward_pre_hook(lambda _m, args, q=q: (q(args[0]), *args[1:]))
    return plain


def torchao_layers(model: nn.Module) -> dict[str, str]:
    """How each converted layer of a ``to_torchao`` model runs: its name -> a short description."""
    ao = require_optional("torchao.quantization")
    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, ao.Int8Tensor):
            dynamic = getattr(weight, "act_quant_kwargs", None) is not None
            out[name] = "int8 x int8 matmul (torchao _int_mm)" if dynamic else "int8 weight, dequantized matmul"
        elif isinstance(weight, ao.IntxUnpackedToInt8Tensor):
            out[name] = f"{weight.target_dtype} codes in int8, dequantized float convolution"
    return out


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
