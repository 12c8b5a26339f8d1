"""A real bit-packed export of a fake-quantized model, its loader and a size report.

The file (version 3) is a safetensors file: any safetensors reader lists its tensors, and
``__metadata__`` holds ``format`` ("dg-quant packed model"), ``version``, ``header`` (JSON:
backbone, num_classes, user metadata, activation quantizers and one entry per state-dict tensor
naming the tensors that hold it; plain tensors are stored under their own name) and ``crc32`` (CRC-32 of the header JSON and the tensor bytes).
Entries of kind "packed" hold b-bit unsigned codes (integer + Q_N), bit-packed LSB first, as a
uint8 tensor ``NAME:codes`` and their per-channel FP32 steps as ``NAME:step``; "pow2" entries (INQ
weights) hold b-bit codes ``sign << (b-1) | exponent slot`` in ``NAME:codes`` with n1, n2 in the
header, then, only if some weights are not on a level (an unfinished INQ partition), a 1-bit
mask ``NAME:escape_mask`` and their raw values ``NAME:escape_values``; "fp" entries (BatchNorm,
biases, the FP classifier) are plain tensors under their state-dict name (dtype and shape
are safetensors').

The loader rebuilds a plain model whose quantized weights are ``code * step`` computed in
float32 (or ±2^n for INQ), exactly what the fake-quant forward computes, so outputs are
bit-identical. Files of versions 1 and 2 (dg-quant's own "DGQX" container) still load
(``dg_quant.quant.export_legacy``).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dg_quant.errors import CheckpointError
from dg_quant.io import atomic_write_bytes
from dg_quant.quant.api import ACT_QUANTIZER, iter_quantized_weights, latent_weight, quantize_
from dg_quant.quant.config import LSQConfig, QuantConfig
from dg_quant.quant.export_legacy import MAGIC, read_legacy
from dg_quant.quant.inq import INQ_BUFFERS, InqLayer, inq_decode, inq_encode, iter_inq_layers
from dg_quant.quant.lsq import LSQQuantizer

ModelBuilder = Callable[[dict[str, Any]], nn.Module]

FORMAT = "dg-quant packed model"
VERSION = 3  # 3: safetensors; 2: "pow2" entries for INQ weights (DGQX container); 1: DGQX
CHUNK = 1 << 20  # values packed per numpy call (a multiple of 8 keeps chunks byte aligned)


# -- bit packing ----------------------------------------------------------------------------


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack unsigned codes < 2^bits into ``ceil(n * bits / 8)`` bytes, LSB first."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    out = []
    for start in range(0, codes.size, CHUNK):
        chunk = codes[start : start + CHUNK]
        planes = np.unpackbits(chunk[:, None], axis=1, bitorder="little")[:, :bits]
        out.append(np.packbits(planes.reshape(-1), bitorder="little").tobytes())
    return b"".join(out)


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: ``count`` codes as uint8."""
    raw = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(count, dtype=np.uint8)
    chunk_bytes = CHUNK * bits // 8
    for i, start in enumerate(range(0, count, CHUNK)):
        n = min(CHUNK, count - start)
        planes = np.unpackbits(raw[i * chunk_bytes :], count=n * bits, bitorder="little").reshape(n, bits)
        out[start : start + n] = np.packbits(planes, axis=1, bitorder="little").reshape(-1)
    return out


# -- export ---------------------------------------------------------------------------------


@dataclass
class SizeReport:
    """Sizes in bytes; ``file_bytes`` is the file's real size on disk."""

    file_bytes: int
    header_bytes: int
    packed_weight_bytes: int
    scale_bytes: int
    fp_bytes: int
    quantized_params: int
    fp_params: int
    bits: list[int]
    escape_bytes: int = 0  # INQ weights not yet on a level: their mask and raw values
    escape_params: int = 0

    @property
    def fp32_bytes(self) -> int:
        """The same tensors stored as plain FP32 (quantized weights at 4 bytes each)."""
        return self.quantized_params * 4 + self.fp_bytes

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / max(self.file_bytes, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fp32_bytes": self.fp32_bytes, "compression_ratio": self.ratio}

    def table(self) -> str:
        mib = 2**20
        return "\n".join(
            [
                f"file            {self.file_bytes / mib:10.3f} MiB  (real size on disk)",
                f"  packed codes  {self.packed_weight_bytes / mib:10.3f} MiB  "
                f"({self.quantized_params} weights at {'/'.join(map(str, sorted(set(self.bits)))) or '-'} bits)",
                f"  scales        {self.scale_bytes / mib:10.3f} MiB",
                *(
                    [
                        f"  INQ unfrozen  {self.escape_bytes / mib:10.3f} MiB  ({self.escape_params} weights not on a "
                        f"level yet, stored exactly)"
                    ]
                    if self.escape_params
                    else []
                ),
                f"  FP remainder  {self.fp_bytes / mib:10.3f} MiB  ({self.fp_params} values)",
                f"  header        {self.header_bytes / mib:10.3f} MiB",
                f"FP32 model      {self.fp32_bytes / mib:10.3f} MiB  -> x{self.ratio:.2f} smaller",
            ]
        )


def _quantizer_keys(model: nn.Module) -> tuple[dict[str, tuple[nn.Module, str, LSQQuantizer]], set[str]]:
    """Quantized weights by their plain state-dict key, and the keys their parametrization adds."""
    quantized: dict[str, tuple[nn.Module, str, LSQQuantizer]] = {}
    skip: set[str] = set()
    for name, module, tensor, q in iter_quantized_weights(model):
        prefix = f"{name}.parametrizations.{tensor}" if name else f"parametrizations.{tensor}"
        skip |= {f"{prefix}.original", f"{prefix}.0.step", f"{prefix}.0._extra_state"}
        quantized[f"{name}.{tensor}" if name else tensor] = (module, tensor, q)
    return quantized, skip


def _act_quantizers(model: nn.Module) -> dict[str, dict[str, Any]]:
    out = {}
    for name, module in model.named_modules():
        q = getattr(module, ACT_QUANTIZER, None)
        if isinstance(q, LSQQuantizer):
            out[name] = {"bits": q.bits, "mode": q.config.mode, "init": q.config.init, **q.get_extra_state()}
    return out


@torch.no_grad()
def export_model(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> SizeReport:
    """Write ``model`` (fake-quantized or not) to ``path``; returns the size report of the file.

    ``meta`` may carry ``backbone``, ``num_classes`` and ``backbone_kwargs`` so that a builder handed
    to ``load_export`` can rebuild the network from the file alone.
    """
    quantized, skip = _quantizer_keys(model)
    inq, inq_skip = _inq_keys(model, quantized)
    skip |= inq_skip
    entries: list[dict[str, Any]] = []
    tensors: dict[str, torch.Tensor] = {}

    def add(key: str, value: torch.Tensor) -> str:
        tensors[key] = value.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        return key

    for key, value in model.state_dict(keep_vars=False).items():
        if key in skip or not isinstance(value, torch.Tensor):
            continue
        entries.append(_fp_entry(key, value, add))
    for key, (module, tensor, q) in quantized.items():
        latent = latent_weight(module, tensor).detach()
        if not q.enabled:  # a disabled quantizer is the identity: the weight is FP
            entries.append(_fp_entry(key, latent, add))
            continue
        qn, _qp = q.bounds
        codes = (q.integers(latent) + qn).to(torch.int64).cpu().numpy().astype(np.uint8)
        entries.append(
            {
                "name": key,
                "kind": "packed",
                "dtype": str(latent.dtype).removeprefix("torch."),
                "shape": list(latent.shape),
                "bits": q.bits,
                "qn": qn,
                "codes": add(f"{key}:codes", _uint8(pack_bits(codes, q.bits))),
                "step": add(f"{key}:step", q.step.detach().to(torch.float32)),
            }
        )
    for key, layer in inq.items():
        entries.append(_inq_entry(key, layer, add))
    header = {
        "format": FORMAT,
        "version": VERSION,
        **(meta or {}),
        "act_quantizers": _act_quantizers(model),
        "entries": entries,
    }
    atomic_write_bytes(
        path, _safetensors_bytes(tensors, json.dumps(header, sort_keys=True, separators=(",", ":"), default=str))
    )
    return size_report(path)


def _fp_entry(key: str, value: torch.Tensor, add: Callable[[str, torch.Tensor], str]) -> dict[str, Any]:
    """A plain tensor, stored under its state-dict name (its dtype and shape are safetensors')."""
    add(key, value)
    return {"name": key, "kind": "fp"}


def _uint8(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _safetensors_bytes(tensors: dict[str, torch.Tensor], header: str) -> bytes:
    """The safetensors file, its metadata carrying the header and the CRC-32 of header + tensor bytes."""
    from safetensors.torch import save

    metadata = {"format": FORMAT, "version": str(VERSION), "header": header}
    data = save(tensors, metadata)  # the tensor bytes do not depend on the metadata
    crc = zlib.crc32(_tensor_buffer(data), zlib.crc32(header.encode()))
    return save(tensors, {**metadata, "crc32": str(crc)})


def _tensor_buffer(data: bytes) -> bytes:
    (length,) = struct.unpack_from("<Q", data)
    return data[8 + length :]


def _inq_keys(model: nn.Module, quantized: dict) -> tuple[dict[str, InqLayer], set[str]]:
    """INQ weights by state-dict key, and the keys not written: the weights and the training buffers.

    The buffers (frozen mask, exponents, partition count) only drive training; n1/n2 go into the
    weight's header entry instead, so the reloaded model is the plain backbone.
    """
    layers: dict[str, InqLayer] = {}
    skip: set[str] = set()
    for layer in iter_inq_layers(model):
        prefix = f"{layer.name}." if layer.name else ""
        skip |= {prefix + b for b in INQ_BUFFERS}
        if prefix + "weight" not in quantized:  # an LSQ quantizer on the same weight wins
            layers[prefix + "weight"] = layer
            skip.add(prefix + "weight")
    return layers, skip


def _inq_entry(key: str, layer: InqLayer, add: Callable[[str, torch.Tensor], str]) -> dict[str, Any]:
    """One INQ weight: b-bit sign/exponent codes, plus the weights not on a level (kept exactly).

    A tensor whose first partition was never applied, or whose codes would not be smaller than
    its raw bytes, is written as a plain "fp" entry.
    """
    weight = layer.module.weight.detach().cpu()
    if layer.partitions_applied:
        codes, exact = inq_encode(weight, layer.n1, layer.n2)
        escaped = ~exact.reshape(-1)
        packed = pack_bits(codes.reshape(-1).numpy(), layer.bits)
        mask = pack_bits(escaped.numpy().astype(np.uint8), 1) if escaped.any() else b""
        values = weight.reshape(-1)[escaped]
        if len(packed) + len(mask) + values.numel() * values.element_size() < weight.numel() * weight.element_size():
            entry = {
                "name": key,
                "kind": "pow2",
                "dtype": str(weight.dtype).removeprefix("torch."),
                "shape": list(weight.shape),
                "bits": layer.bits,
                "n1": layer.n1,
                "n2": layer.n2,
                "partitions_applied": layer.partitions_applied,
                "escapes": int(escaped.sum()),
                "codes": add(f"{key}:codes", _uint8(packed)),
            }
            if escaped.any():
                entry["escape_mask"] = add(f"{key}:escape_mask", _uint8(mask))
                entry["escape_values"] = add(f"{key}:escape_values", values)
            return entry
    return _fp_entry(key, weight, add)


# -- reading --------------------------------------------------------------------------------


def read_export(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Validate the file and return (header, tensors); any damage is a one-line ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; export a run first with dgq_export")
    data = path.read_bytes()
    if data[:4] == MAGIC:
        return read_legacy(path, data)
    if len(data) < 9:
        raise CheckpointError(f"{path} is truncated ({len(data)} bytes); export it again")
    (length,) = struct.unpack_from("<Q", data)
    if data[8:9] != b"{":
        raise CheckpointError(
            f"{path} is not a dg-quant export (neither safetensors nor DGQX); export it with dgq_export"
        )
    if 8 + length > len(data):
        raise CheckpointError(f"{path} is truncated: its header alone needs {8 + length} bytes; export it again")
    try:
        index = json.loads(data[8 : 8 + length])
        metadata = index.pop("__metadata__", None) or {}
        end = max((int(t["data_offsets"][1]) for t in index.values()), default=0)
    except (ValueError, TypeError, KeyError, AttributeError):
        raise CheckpointError(f"{path} is corrupt (unreadable safetensors header); export it again") from None
    if metadata.get("format") != FORMAT or "header" not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not a dg-quant export; export it with dgq_export")
    if int(metadata.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path} has format version {metadata['version']}; this dg-quant reads up to {VERSION}")
    buffer = data[8 + length :]
    if len(buffer) < end:
        raise CheckpointError(f"{path} is truncated: {len(data)} of {8 + length + end} bytes; export it again")
    if len(buffer) > end:
        raise CheckpointError(f"{path} is corrupt: {len(buffer) - end} unexpected trailing bytes; export it again")
    if str(zlib.crc32(buffer, zlib.crc32(metadata["header"].encode()))) != metadata.get("crc32"):
        raise CheckpointError(f"{path} is corrupt (checksum mismatch); export it again")
    from safetensors.torch import load

    try:
        header, tensors = json.loads(metadata["header"]), load(data)
    except Exception:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise CheckpointError(f"{path} is corrupt (unreadable tensors); export it again") from None
    return header, tensors


def _tensor(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"corrupt export: tensor {key} is missing")
    return tensors[key]


def exported_state_dict(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain (baked) state dict: packed weights become ``code * step`` in their dtype."""
    state = {}
    for e in header["entries"]:
        if e["kind"] == "fp":
            state[e["name"]] = _tensor(tensors, e.get("tensor", e["name"]))
            continue
        count = int(np.prod(e["shape"]))
        codes = _tensor(tensors, e["codes"]).numpy().tobytes()
        if e["kind"] == "pow2":
            state[e["name"]] = _pow2_weight(e, codes, tensors)
            continue
        ints = torch.from_numpy(unpack_bits(codes, e["bits"], count).astype(np.int64))
        step = _tensor(tensors, e["step"])
        weights = (ints - e["qn"]).to(torch.float32).reshape(e["shape"])
        state[e["name"]] = (weights * step).to(getattr(torch, e["dtype"]))
    return state


def _pow2_weight(e: dict[str, Any], codes: bytes, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    count = int(np.prod(e["shape"]))
    ints = torch.from_numpy(unpack_bits(codes, e["bits"], count))
    weight = inq_decode(ints, e["n1"], e["n2"], getattr(torch, e["dtype"]))
    if e["escapes"]:
        mask = _tensor(tensors, e["escape_mask"]).numpy().tobytes()
        escaped = torch.from_numpy(unpack_bits(mask, 1, count).astype(bool))
        weight[escaped] = _tensor(tensors, e["escape_values"])
    return weight.reshape(e["shape"])


def load_export(path: str | os.PathLike, model: nn.Module | ModelBuilder) -> nn.Module:
    """Load the export at ``path`` into ``model``, in eval mode.

    ``model`` is the built network, or a builder called with the file's header (its ``backbone``,
    ``num_classes`` and ``backbone_kwargs`` metadata) that returns it: the file format does not
    know how networks are made, the caller does (``dg_quant.registry.rebuild_adapter`` builds
    from the adapter registry).
    """
    header, tensors = read_export(path)
    if not isinstance(model, nn.Module):
        model = model(header)
    _attach_act_quantizers(model, header.get("act_quantizers", {}))
    state = exported_state_dict(header, tensors)
    for name, spec in header.get("act_quantizers", {}).items():
        state[f"{name}.{ACT_QUANTIZER}._extra_state" if name else f"{ACT_QUANTIZER}._extra_state"] = spec
    own = model.state_dict()  # version 1 wrote INQ training buffers; a plain model has none
    state = {k: v for k, v in state.items() if k in own or k.rsplit(".", 1)[-1] not in INQ_BUFFERS}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise CheckpointError(
            f"{path} does not match the model ({first}); pass the backbone it was exported from"
        ) from None
    return model.eval()


def _attach_act_quantizers(model: nn.Module, specs: dict[str, dict[str, Any]]) -> None:
    if not specs:
        return
    by_config: dict[tuple, set[str]] = {}
    for name, spec in specs.items():
        by_config.setdefault((spec["bits"], spec["mode"], spec["init"]), set()).add(name)
    for (bits, mode, init), names in by_config.items():
        act = LSQConfig(bits=bits, mode=mode, granularity="per_tensor", init=init)
        quantize_(
            model,
            QuantConfig(weight=None, activation=act, quantize_head=True),
            filter_fn=lambda _m, n, names=names: n in names,
        )


def size_report(path: str | os.PathLike) -> SizeReport:
    """What the file at ``path`` holds, from its header, its tensors and its real size."""
    header, tensors = read_export(path)
    packed = [e for e in header["entries"] if e["kind"] in ("packed", "pow2")]
    fp = [e for e in header["entries"] if e["kind"] == "fp"]

    for e in fp:
        e.setdefault("tensor", e["name"])

    def nbytes(entries: list[dict[str, Any]], key: str) -> int:
        return sum(tensors[e[key]].numel() * tensors[e[key]].element_size() for e in entries if key in e)

    file_bytes = os.path.getsize(path)
    return SizeReport(
        file_bytes=file_bytes,
        header_bytes=file_bytes - sum(t.numel() * t.element_size() for t in tensors.values()),
        packed_weight_bytes=nbytes(packed, "codes"),
        scale_bytes=nbytes(packed, "step"),
        fp_bytes=nbytes(fp, "tensor"),
        quantized_params=sum(int(np.prod(e["shape"])) for e in packed),
        fp_params=sum(tensors[e["tensor"]].numel() for e in fp),
        bits=[e["bits"] for e in packed],
        escape_bytes=nbytes(packed, "escape_mask") + nbytes(packed, "escape_values"),
        escape_params=sum(e.get("escapes", 0) for e in packed),
    )


def torch_save_bytes(model: nn.Module) -> int:
    """Real size of ``torch.save`` of the model's plain float state dict (the FP32 reference file)."""
    quantized, skip = _quantizer_keys(model)
    skip |= {k for k in _inq_keys(model, quantized)[1] if k.rsplit(".", 1)[-1] in INQ_BUFFERS}
    state = {k: v for k, v in model.state_dict().items() if k not in skip and isinstance(v, torch.Tensor)}
    state.update({k: latent_weight(m, t).detach() for k, (m, t, _q) in quantized.items()})
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "fp32.pt"
        torch.save(state, file)
        return file.stat().st_size
