"""``--logger wandb``: an offline Weights & Biases run holding the records of results.jsonl.

Needs the ``wandb`` extra (skipped without it). The run's ``.wandb`` file is read back with a
reader of its record log (LevelDB log blocks of W&B protobuf records), as ``wandb sync`` reads it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

wandb_internal_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")

from dg_quant.adapters.wilds.cli import main  # noqa: E402

ARGS = [
    *("-p", "dg_quant.qtdog", "--bits", "6", "--quant_start_step", "2", "--n_steps", "4", "--eval_every", "2"),
    *("--no-group_logging", "--no_progress", "--device", "cpu", "--logger", "wandb"),
]
BLOCK, HEADER = 32768, 7  # LevelDB log block size; the file's and each chunk's header length


def _chunks(raw: bytes):
    """Whole records of a LevelDB-style log (full, or first/middle/last chunks joined)."""
    pos, pending = HEADER, b""
    while pos + HEADER <= len(raw):
        if BLOCK - pos % BLOCK < HEADER:  # block trailer
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + HEADER])
        data, pos = raw[pos + HEADER : pos + HEADER + length], pos + HEADER + length
        if kind in (1, 4):
            yield pending + data
            pending = b""
        elif kind in (2, 3):
            pending += data


def _history(log_dir: Path) -> list[dict]:
    (path,) = log_dir.glob("wandb/offline-run-*/run-*.wandb")
    rows = []
    for data in _chunks(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


@pytest.mark.slow
def test_wandb_offline_run_logs_the_records(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline by default: no account, no network
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_dir = tmp_path / "run"
    assert main([*ARGS, "--log_dir", str(log_dir)]) == 0
    import wandb

    wandb.finish()  # flush the offline run (a process exiting does it too)
    records = [json.loads(line) for line in (log_dir / "results.jsonl").read_text().splitlines()]
    history = _history(log_dir)
    assert [h["_step"] for h in history] == [r["step"] for r in records] == [2, 4]
    for row, record in zip(history, records):
        for key in ("test/acc_avg", "train/loss", "compression_ratio", "quantized_param_fraction", "packed_mb"):
            assert row[key] == pytest.approx(record[key])
    assert history[-1]["quantized"] == 1.0
