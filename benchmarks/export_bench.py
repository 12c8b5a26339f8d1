"""Inference latency and stored size of exported quantized models against the FP model.

With ``dg_quant.quant.export`` the quantized model is written as a real bit-packed file and loaded
back into a plain copy of the FP architecture (weights ``code * step`` in float32, activation
fake quantizers re-attached); the size is the file's size and the FP reference is ``torch.save``.
Without it (or if the export fails) the model is baked in place (``bake_``) and the size is the
bit-packed estimate of ``compression_report``.
"""

from __future__ import annotations

import copy
import importlib
import tempfile
from pathlib import Path

import torch
from torch import nn

from benchmarks import measure
from dg_quant.quant import bake_, compression_report, iter_quantized_weights

CALLS = 3
MB = 2**20


def _plain(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # unwrap torch.compile


def _latency_ms(model: nn.Module, x: torch.Tensor, device: torch.device, repeats: int, clock: str) -> float:
    model.eval()
    with torch.inference_mode():
        model(x)  # warm up
        times = [measure.seconds_per_call(lambda: model(x), CALLS, device, clock) for _ in range(repeats)]
    return measure.median(times) * 1e3


def _exporter():
    try:
        return importlib.import_module("dg_quant.quant.export")
    except ImportError:
        return None


def _export(model: nn.Module, fp: nn.Module, exporter) -> tuple[nn.Module, float, str]:
    """(inference model, size in MB, how it was exported)."""
    if exporter is not None:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.dgq"
                size = exporter.export_model(model, path).file_bytes
                loaded = exporter.load_export(path, copy.deepcopy(fp))
            return loaded, size / MB, "dgq export file, loaded back"
        except Exception as exc:  # noqa: BLE001 - report it and fall back to baking
            reason = f"export failed: {type(exc).__name__}"
    else:
        reason = "no dg_quant.quant.export"
    size = compression_report(model).summary()["packed_mb"]
    return bake_(copy.deepcopy(model)), size, f"bake_, bit-packed estimate ({reason})"


@torch.no_grad()
def _max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    a.eval(), b.eval()
    return float((a(x).float() - b(x).float()).abs().max())


def inference_rows(
    name: str,
    models: dict[str, nn.Module],
    x: torch.Tensor,
    device: torch.device,
    repeats: int,
    clock: str = "wall",
) -> list[dict]:
    """One row for the FP model and one per method whose model has quantized weights."""
    exporter = _exporter()
    fp = _plain(models["erm"])
    fp_ms = _latency_ms(copy.deepcopy(fp), x, device, repeats, clock)
    fp_mb = (exporter.torch_save_bytes(fp) if exporter else compression_report(fp).fp32_bytes) / MB
    rows = [
        {
            "model": name,
            "variant": "fp32",
            "batch": x.shape[0],
            "latency_ms": fp_ms,
            "ratio_vs_fp": 1.0,
            "size_mb": fp_mb,
            "compression": 1.0,
            "max_abs_diff": None,
            "export": "torch.save file" if exporter else "fp32 estimate",
        }
    ]
    for method, model in models.items():
        model = _plain(model)
        if method == "erm" or not any(True for _ in iter_quantized_weights(model)):
            continue
        exported, size_mb, how = _export(model, fp, exporter)
        ms = _latency_ms(exported, x, device, repeats, clock)
        rows.append(
            {
                "model": name,
                "variant": method,
                "batch": x.shape[0],
                "latency_ms": ms,
                "ratio_vs_fp": ms / fp_ms,
                "size_mb": size_mb,
                "compression": fp_mb / size_mb,
                "max_abs_diff": _max_diff(exported, model, x),
                "export": how,
            }
        )
    return rows
