"""``wilds_run --logger tensorboard wandb csv``: the records of ``results.jsonl`` in other tools' formats.

Every evaluation record (losses, ``<split>/<metric>``, and the quantization figures plugins add:
``quantized``, ``quantized_param_fraction``, ``compression_ratio``, ``packed_mb``, FQAT's
``fqat/frozen_fraction`` ...) goes to each chosen sink when ``results.jsonl`` is written:

- ``tensorboard``: scalars in ``<log_dir>/tensorboard/`` (``tensorboard --logdir runs/``), one tag
  per key, at the record's step;
- ``wandb``: a Weights & Biases run in ``<log_dir>/wandb/``, one key per record key at the record's
  step. It runs **offline** unless ``WANDB_MODE`` says otherwise (no account or network needed);
  ``wandb sync <log_dir>/wandb/offline-run-*`` uploads it later, ``WANDB_MODE=online`` logs live.
  ``WANDB_PROJECT`` names the project (default ``dg-quant``); the run is named after ``log_dir``
  and a resumed run continues the same W&B run (its id is derived from the folder);
- ``csv``: ``<log_dir>/results.csv``, one row per record, rewritten whole (atomically) each time,
  so it always equals ``results.jsonl``.

A resumed run appends to TensorBoard and W&B only the records it adds (events an interrupted run wrote
after its checkpoint are purged).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dg_quant.errors import require_optional
from dg_quant.io import atomic_write_text

LOGGERS = ("tensorboard", "wandb", "csv")


class CsvLogger:
    """``results.csv``: the records as a table, columns in order of first appearance."""

    def __init__(self, log_dir: Path) -> None:
        self.path = log_dir / "results.csv"

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        columns = list(dict.fromkeys(k for r in records for k in r))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        atomic_write_text(self.path, buffer.getvalue())


class TensorBoardLogger:
    """Scalars through ``torch.utils.tensorboard.SummaryWriter``, flushed after every record."""

    def __init__(self, log_dir: Path) -> None:
        require_optional("tensorboard")  # SummaryWriter needs it; fail in one line naming the extra
        self.folder = log_dir / "tensorboard"
        self.writer = None
        self.sent = 0  # records already written

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # The records before the newest were logged by the process that wrote them (a
            # resumed run starts from its checkpoint's records); purge anything logged later.
            self.writer = SummaryWriter(str(self.folder), purge_step=int(records[-1]["step"]))
            new = records[-1:]
        else:
            new = records[self.sent :]
        for record in new:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, bool | int | float):
                    self.writer.add_scalar(key, float(value), step)
        self.writer.flush()
        self.sent = len(records)


class WandbLogger:
    """Scalars through ``wandb.log``; the W&B run starts with the first record this process writes."""

    def __init__(self, log_dir: Path) -> None:
        require_optional("wandb")
        self.log_dir = log_dir
        self.run = None
        self.sent = 0

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        if self.run is None:
            import wandb

            folder = self.log_dir.resolve()
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "dg-quant"),
                name=folder.name,
                id=hashlib.sha1(str(folder).encode()).hexdigest()[:16],  # the same run when resumed
                resume="allow",
                dir=str(self.log_dir),
                mode=os.environ.get("WANDB_MODE", "offline"),
            )
            new = records[-1:]  # the earlier ones were logged by the process that wrote them
        else:
            new = records[self.sent :]
        for record in new:
            scalars = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, bool | int | float)}
            self.run.log(scalars, step=int(record["step"]))
        self.sent = len(records)


class RecordLoggers:
    """The sinks a run writes its records to, besides ``results.jsonl``."""

    def __init__(self, names: Sequence[str] | None, log_dir: str | Path) -> None:
        kinds = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger, "csv": CsvLogger}
        self.loggers = [kinds[name](Path(log_dir)) for name in dict.fromkeys(names or ())]

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        for logger in self.loggers:
            logger.write(records)
