"""Safe files: atomic writes, the umask's permissions, strict JSON and verified checkpoints.

- A crash never leaves a half-written result or checkpoint behind: each file is written to a
  temporary file beside it and renamed over the target (``.<name>.*.tmp`` until then).
- Files get the permissions of an ordinary ``open()`` (``0o666`` minus the umask, typically 0644),
  not ``mkstemp``'s private 0600, so result folders can be shared.
- JSON is strict: a non-finite float becomes ``null``, never a bare ``NaN``/``Infinity`` that
  other JSON readers reject.
- ``torch.save`` files are zip archives whose records each carry a CRC-32; ``load_torch_file``
  checks every record before unpickling, so a flipped bit or a truncated file is reported as a
  damaged checkpoint instead of loading silently.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from dg_quant.errors import CheckpointError, OutputError

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_replace(path: str | os.PathLike, write: Any) -> None:
    """Write through ``write(handle)`` to a temporary file, then rename it to ``path``.

    A failure to write (disk full, read-only folder, a folder named ``path``) is one OutputError
    line; the previous ``path``, if any, is left as it was.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder; give a file name")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        reason = _write_failure(exc)
        if reason is None:
            raise
        raise OutputError(f"cannot write {path}: {reason}; free space or choose a writable folder") from None


def _write_failure(exc: BaseException) -> str | None:
    """Why a write failed, for an OSError or torch.save's RuntimeError (``inline_container.cc``); else None."""
    if isinstance(exc, OutputError):
        return None  # already one line
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if isinstance(exc, RuntimeError) and any(
        mark in str(exc) for mark in ("inline_container", "PytorchStreamWriter", "file write failed")
    ):
        return "the file system refused the data (disk full or file size limit)"
    return None


def remove_stale_temporaries(folder: str | os.PathLike, older_than_s: float = 0.0) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files that a killed writer left in ``folder``; returns them.

    Only call this on a folder that no other process writes to (a locked run folder).
    """
    removed = []
    now = time.time()
    for tmp in Path(folder).glob(f".*{TMP_SUFFIX}"):
        try:
            if tmp.is_file() and now - tmp.stat().st_mtime >= older_than_s:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    _atomic_replace(path, lambda h: h.write(text.encode()))


def json_dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes non-finite floats as ``null`` and refuses anything else non-standard."""
    return json.dumps(finite_or_none(obj), allow_nan=False, default=_json_default, **kwargs)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json_dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json_dumps(r, sort_keys=True) + "\n" for r in records))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    _atomic_replace(path, lambda h: torch.save(obj, h))


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (also inside dicts, lists, 1-element tensors) as None."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return finite_or_none(value.item())
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` (e.g. a rendered PNG) atomically."""
    _atomic_replace(path, lambda h: h.write(data))


def verify_torch_file(path: str | os.PathLike) -> None:
    """Check the CRC-32 of every record of a ``torch.save`` archive; CheckpointError if one differs.

    Reads the file once (about as fast as the load itself); a truncated file fails here too.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as record:  # zipfile checks the CRC at the end of each record
                    while record.read(1 << 22):
                        pass
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        what = (
            "damaged (a record fails its checksum)"
            if "CRC" in str(exc)
            else f"damaged or foreign ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        )
        raise CheckpointError(
            f"{path} is {what}; it cannot be trusted: use another copy or start the run over"
        ) from None


def load_torch_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` after ``verify_torch_file``: a damaged file is one CheckpointError line."""
    verify_torch_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # a foreign archive
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"cannot read {path}: {type(exc).__name__}: {first}; the file is damaged or foreign"
        ) from None
