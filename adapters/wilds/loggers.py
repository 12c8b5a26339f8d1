"""``wilds_run --logger tensorboard csv``: the records of ``results.jsonl`` in other tools' formats.

Every evaluation record (losses, ``<split>/<metric>``, and the quantization figures plugins add:
``quantized``, ``quantized_param_fraction``, ``compression_ratio``, ``packed_mb``, FQAT's
``fqat/frozen_fraction`` ...) goes to each chosen sink when ``results.jsonl`` is written:

- ``tensorboard``: scalars in ``<log_dir>/tensorboard/`` (``tensorboard --logdir runs/``), one tag
  per key, at the record's step;
- ``csv``: ``<log_dir>/results.csv``, one row per record, rewritten whole (atomically) each time,
  so it always equals ``results.jsonl``.

A resumed run appends to TensorBoard only the records it adds (events an interrupted run wrote
after its checkpoint are purged).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dg_quant.errors import require_optional
from dg_quant.io import atomic_write_text

LOGGERS = ("tensorboard", "csv")


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


class RecordLoggers:
    """The sinks a run writes its records to, besides ``results.jsonl``."""

    def __init__(self, names: Sequence[str] | None, log_dir: str | Path) -> None:
        kinds = {"tensorboard": TensorBoardLogger, "csv": CsvLogger}
        self.loggers = [kinds[name](Path(log_dir)) for name in dict.fromkeys(names or ())]

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        for logger in self.loggers:
            logger.write(records)
