"""Write the benchmark table as Markdown and JSON (atomically, via ``dg_quant.io``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dg_quant.io import atomic_write_json, atomic_write_text


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"# dg-quant training-step benchmark: {meta['device_name']}",
        "",
        f"{meta['date']}; torch {meta['torch']}; device `{meta['device']}`, {meta['threads']} threads; "
        f"amp {meta['amp']}; channels_last {meta['channels_last']}; compile {meta['compile']}; "
        f"LSQ kernels {meta['quant_kernel']}; "
        f"clock {meta['clock']}; image {meta['image_size']} px; median of {meta['repeats']} repeats x {meta['steps']} steps "
        f"after {meta['warmup']} warm-up steps; methods timed interleaved in one process. "
        f"Load average at start/end: {meta['load_start']} / {meta['load_end']}.",
        "",
        "x FP is the median over repeats of (method step time / ERM step time of the same repeat); "
        "best: the method's fastest round over ERM's fastest (on a shared CPU other jobs only add time).",
        "Saved MB: tensors one training forward keeps for backward (weights included); "
        "peak MB: CUDA allocator peak of one step (CUDA only); "
        "ops/step: ATen operators one step dispatches, views excluded (about one GPU kernel launch each).",
        "",
        "| model | method | batch | step ms | x FP | best | target | samples/s | saved MB | peak MB | ops/step | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["training"]:
        lines.append(
            f"| {r['model']} | {r['label']} | {r['batch']} | {_fmt(r['step_ms'], '.1f')} | "
            f"{_fmt(r['ratio_vs_fp'], '.2f')} | {_fmt(r.get('ratio_best'), '.2f')} | {_fmt(r['target'], '.2f')} | "
            f"{_fmt(r['samples_per_s'], '.1f')} | "
            f"{_fmt(r['saved_mb'], '.1f')} | {_fmt(r['peak_mb'], '.0f')} | {_fmt(r.get('ops_per_step'), 'd')} | "
            f"{r['note']} |"
        )
    if result["inference"]:
        lines += [
            "",
            "## Inference of the exported model",
            "",
            "Max diff: largest |logit difference| between the exported model and the fake-quant model.",
            "",
            "| model | variant | batch | latency ms | x FP | size MB | x smaller | max diff | export |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["inference"]:
            lines.append(
                f"| {r['model']} | {r['variant']} | {r['batch']} | {_fmt(r['latency_ms'], '.2f')} | "
                f"{_fmt(r['ratio_vs_fp'], '.2f')} | {_fmt(r['size_mb'], '.2f')} | "
                f"{_fmt(r['compression'], '.1f')} | {_fmt(r['max_abs_diff'], '.1e')} | {r['export']} |"
            )
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.json`` under ``out_dir``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    atomic_write_text(md, markdown(result))
    atomic_write_json(js, result)
    return md, js
