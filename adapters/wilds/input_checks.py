"""Bad input files: found before training where that is cheap, named where it is not.

- Before training, every image file of the dataset is checked to **exist** (one ``stat`` each:
  seconds for Camelyon17's 455k patches), so a missing patch is a one-line error before any
  work is done, not a crash at the first evaluation.
- Decoding every image up front would cost about as much as an epoch on Camelyon17, so a file
  that exists but cannot be decoded is found when it is first read: the error names the file
  (``DataError``), and ``wilds_run`` keeps the training done so far (``last.pt``) so that
  ``--resume`` continues once the file is replaced. Skipping bad examples silently was not
  chosen: it would change the official metrics' denominators without anyone noticing.
"""

from __future__ import annotations

import os
import re
from typing import Any

from dg_quant.errors import DataError, DGQuantError

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")


def input_paths(dataset: Any) -> list[str] | None:
    """The input file of every example, for datasets whose inputs are image files; else None."""
    paths = getattr(dataset, "_paths", None)  # DomainBed-layout folders (folders.py)
    if paths is not None:
        return list(paths)
    names = getattr(dataset, "_input_array", None)
    data_dir = getattr(dataset, "_data_dir", None)
    if names is None or data_dir is None or len(names) == 0:
        return None
    first = names[0]
    if not isinstance(first, str) or not first.lower().endswith(_IMAGE_SUFFIXES):
        return None  # text (Amazon) or arrays
    return [os.path.join(data_dir, name) for name in names]


def check_inputs_exist(dataset: Any, name: str) -> None:
    """DataError naming the missing input files (the first three and their number), if any."""
    paths = input_paths(dataset)
    if not paths:
        return
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise DataError(
            f"{len(missing)} of the {len(paths)} input files of {name} are missing ({shown}); "
            "restore them (or download the dataset again) before training"
        )


class NamedInputErrors:
    """Wraps a dataset's ``get_input`` so that a file that cannot be read is named in one line."""

    def __init__(self, dataset: Any, name: str) -> None:
        self.get_input = dataset.get_input
        self.paths = input_paths(dataset)
        self.name = name

    def __call__(self, idx: int) -> Any:
        try:
            return self.get_input(idx)
        except DGQuantError:
            raise
        except Exception as exc:
            where = self.paths[idx] if self.paths is not None else f"example {idx}"
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(
                f"cannot read input {where} of {self.name} ({type(exc).__name__}: {reason}); "
                "replace the file, then continue with --resume"
            ) from None


def guard_inputs(dataset: Any, name: str) -> None:
    """Check that every input file exists, and name any that fails to load later."""
    check_inputs_exist(dataset, name)
    if callable(getattr(dataset, "get_input", None)):
        dataset.get_input = NamedInputErrors(dataset, name)


def worker_message(exc: BaseException) -> str:
    """The one-line message of an error re-raised from a DataLoader worker (whose text is the
    worker's whole traceback); other messages unchanged."""
    text = str(exc)
    if "Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    match = re.match(r"^[\w.]+(?:Error|Exception): (.*)$", last)
    return match.group(1) if match else last
