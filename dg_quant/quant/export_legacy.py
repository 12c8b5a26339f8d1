"""Reader for dg-quant's packed files of versions 1 and 2 (the "DGQX" container, before safetensors).

Layout (little endian)::

    preamble  24 bytes: magic b"DGQX", version u16, flags u16, header length u32,
              payload length u64, CRC-32 of header + payload u32
    header    UTF-8 JSON: as version 3's, but each entry gives byte ranges of the payload
              (offset/nbytes, step_offset/step_nbytes, escape_mask_offset/..., escape_value_offset/...)
    payload   the entries' bytes, one after another

``read_legacy`` checks the file and returns the version-3 view of it: the header with each entry
naming its tensors, and those tensors, so that one loader serves every version.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import torch

from dg_quant.errors import CheckpointError

MAGIC = b"DGQX"
LAST_VERSION = 2
PREAMBLE = struct.Struct("<4sHHIQI")


def read_legacy(path: Path, data: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, tensors) of a version 1/2 file; any damage is a one-line ``CheckpointError``."""
    if len(data) < PREAMBLE.size:
        raise CheckpointError(
            f"{path} is truncated ({len(data)} bytes, shorter than the {PREAMBLE.size}-byte preamble)"
        )
    magic, version, _flags, header_len, payload_len, crc = PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise CheckpointError(f"{path} is not a dg-quant export (bad magic {magic!r}); export it with dgq_export")
    if version > LAST_VERSION:
        raise CheckpointError(f"{path} has DGQX version {version}, which no dg-quant wrote; export it again")
    expected = PREAMBLE.size + header_len + payload_len
    if len(data) < expected:
        raise CheckpointError(f"{path} is truncated: {len(data)} of {expected} bytes; export it again")
    if len(data) > expected:
        raise CheckpointError(f"{path} is corrupt: {len(data) - expected} unexpected trailing bytes; export it again")
    header_bytes = data[PREAMBLE.size : PREAMBLE.size + header_len]
    payload = data[PREAMBLE.size + header_len :]
    if zlib.crc32(payload, zlib.crc32(header_bytes)) != crc:
        raise CheckpointError(f"{path} is corrupt (checksum mismatch); export it again")
    try:
        header = json.loads(header_bytes)
    except ValueError:
        raise CheckpointError(f"{path} is corrupt (unreadable header); export it again") from None
    tensors: dict[str, torch.Tensor] = {}
    for e in header["entries"]:
        name = e["name"]
        if e["kind"] == "fp":
            e["tensor"] = name
            tensors[name] = _typed(_segment(payload, e["offset"], e["nbytes"], name), e["dtype"], e["shape"])
            continue
        e["codes"] = f"{name}:codes"
        tensors[e["codes"]] = _typed(_segment(payload, e["offset"], e["nbytes"], name), "uint8", [e["nbytes"]])
        if e["kind"] == "packed":
            e["step"] = f"{name}:step"
            step = _segment(payload, e["step_offset"], e["step_nbytes"], name)
            tensors[e["step"]] = _typed(step, "float32", e["step_shape"])
        elif e.get("escapes"):
            e["escape_mask"], e["escape_values"] = f"{name}:escape_mask", f"{name}:escape_values"
            mask = _segment(payload, e["escape_mask_offset"], e["escape_mask_nbytes"], name)
            tensors[e["escape_mask"]] = _typed(mask, "uint8", [len(mask)])
            values = _segment(payload, e["escape_value_offset"], e["escape_value_nbytes"], name)
            tensors[e["escape_values"]] = _typed(values, e["dtype"], [e["escapes"]])
    return header, tensors


def _segment(payload: bytes, offset: int, nbytes: int, name: str) -> bytes:
    if offset < 0 or offset + nbytes > len(payload):
        raise CheckpointError(f"corrupt export: entry {name} points outside the payload")
    return payload[offset : offset + nbytes]


def _typed(data: bytes, dtype: str, shape: list[int]) -> torch.Tensor:
    torch_dtype = getattr(torch, dtype)
    if not data:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(bytearray(data), dtype=torch_dtype).reshape(shape).clone()
