"""Tiny real runs whose outputs must stay bit-identical across refactors (``test_reference_outputs``).

Each run goes through the real commands (``wilds_run``, ``dgq_ptq``, ``dgq_export``) on the
test image folders (``write_image_folders``) with ``test_cnn``; ``fingerprint`` reduces a run
folder to sha256 digests of its weights, optimizer and plugin state, records and settings (paths
left out). ``tests/data/reference_outputs.json`` holds the fingerprints that the code before the
run-context refactor produced; regenerate it only for a deliberate change of results:

    OMP_NUM_THREADS=1 .venv/bin/python -m tests.reference_runs tests/data

which also writes ``tests/data/old_run_qtdog/`` (a QT-DoG run killed after its step-3
checkpoint, as that code wrote it) for the test that resumes an old ``last.pt``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from tests.adapters.wilds.conftest import write_image_folders

# 60 training images of 12 px, batch 8: 7 steps per epoch; evaluation every 3 steps.
COMMON = [
    "--dataset",
    "image_folder",
    "--test_domain",
    "sketch",
    "--model",
    "test_cnn",
    "--image_size",
    "12",
    "--batch_size",
    "8",
    "--eval_every",
    "3",
    "--lr",
    "1e-2",
    "--seed",
    "3",
    "--no_progress",
    "--device",
    "cpu",
    "--threads",
    "1",
]
RUNS: dict[str, list[str]] = {
    "qtdog": ["--n_steps", "6", "--plugin", "dg_quant.qtdog", "--bits", "4", "--quant_start_step", "2"],
    "fqat": [
        "--n_steps",
        "5",
        "--plugin",
        "dg_quant.fqat",
        "--bits",
        "4",
        "--freeze_steps",
        "2",
        "--quantizer",
        "ewgs",
        "--ewgs_hessian",
        "true",
    ],
    "inq": ["--n_steps", "6", "--plugin", "dg_quant.inq", "--bits", "5", "--optimizer", "sgd"],
    # no augmentation (--transform wilds): calibration sees the same pixels whatever transform it uses
    "obc": [
        "--n_steps",
        "3",
        "--transform",
        "wilds",
        "--plugin",
        "dg_quant.obc",
        "--bits",
        "4",
        "--ptq_samples",
        "20",
        "--ptq_batch_size",
        "8",
    ],
    "erm": ["--n_steps", "3", "--transform", "wilds"],
}
PTQ_ARGS = ["--ptq_method", "obc", "--bits", "4", "--ptq_samples", "20", "--ptq_batch_size", "8"]
KILL_AT = 4  # the old-checkpoint run: killed before step 4, so last.pt holds step 3
PATHS = ("log_dir", "root_dir", "resume")  # where the run lives, and whether it was resumed


def _canonical(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8) if t.dtype != torch.bool else t.reshape(-1).to(torch.uint8)
        return ["tensor", str(t.dtype), list(t.shape), hashlib.sha256(raw.numpy().tobytes()).hexdigest()]
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float):
        return repr(obj)
    return obj if obj is None or isinstance(obj, str | int | bool) else repr(obj)


def digest(obj: Any) -> str:
    """sha256 of a nest of dicts, lists, tensors (their bytes) and plain values."""
    return hashlib.sha256(json.dumps(_canonical(obj), sort_keys=True).encode()).hexdigest()


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in PATHS}


def _model_file(path: Path) -> dict[str, str]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    return {"weights": digest(state["model"]), "settings": digest(_settings(state["config"]))}


def without_eval_losses(obj: Any) -> Any:
    """``obj`` without the ``<split>/loss`` keys that evaluation records gained after these
    fingerprints were written (an addition: every other number must stay as it was)."""
    if isinstance(obj, dict):
        return {
            k: without_eval_losses(v)
            for k, v in obj.items()
            if not (isinstance(k, str) and k.endswith("/loss") and k != "train/loss")
        }
    if isinstance(obj, list):
        return [without_eval_losses(v) for v in obj]
    return obj


def fingerprint(log_dir: Path) -> dict[str, Any]:
    """Digests of what a finished ``wilds_run`` folder holds (paths and evaluation losses excluded)."""
    last = without_eval_losses(torch.load(log_dir / "last.pt", map_location="cpu", weights_only=False))
    final = without_eval_losses(json.loads((log_dir / "final.json").read_text()))
    out = {
        "model.pt": _model_file(log_dir / "model.pt"),
        "best_model.pt": _model_file(log_dir / "best_model.pt"),
        "last.pt": {
            "trainer": digest(last["trainer"]),
            "records": digest(last["records"]),
            "settings": digest(_settings(last["config"])),
        },
        "config.json": digest(_settings(json.loads((log_dir / "config.json").read_text()))),
        "results.jsonl": digest(
            without_eval_losses([json.loads(line) for line in (log_dir / "results.jsonl").read_text().splitlines()])
        ),
        "final.json": digest(final),
        "test_at_last": final["test_at_last"],
    }
    for name in ("fqat_disorder.jsonl", "ptq.json"):
        if (log_dir / name).is_file():
            out[name] = digest((log_dir / name).read_text())
    return out


def wilds_run(name: str, root: Path, log_dir: Path, extra: list[str] = ()) -> list[str]:
    from dg_quant.adapters.wilds.cli import main

    argv = [*COMMON, *RUNS[name], "--root_dir", str(root), "--log_dir", str(log_dir), *extra]
    assert main(argv) == 0, name
    return argv


def ptq_fingerprint(run_dir: Path) -> dict[str, Any]:
    from dg_quant.adapters.wilds.ptq import main

    assert main([str(run_dir), *PTQ_ARGS]) == 0
    record = json.loads((run_dir / "ptq_obc_w4.json").read_text())
    return {"ptq_obc_w4.pt": _model_file(run_dir / "ptq_obc_w4.pt"), "ptq_obc_w4.json": digest(record)}


def export_fingerprint(run_dir: Path, out: Path) -> dict[str, str]:
    from dg_quant.adapters.wilds.export import main

    assert main([str(run_dir), "-o", str(out)]) == 0
    return file_fingerprint(out)


def file_fingerprint(path: Path) -> dict[str, str]:
    """What an export holds, independent of its container (DGQX version 2 or safetensors version 3):
    its metadata, and the weights the loader rebuilds (codes times steps, bit for bit)."""
    from dg_quant.quant.export import exported_state_dict, read_export

    header, tensors = read_export(path)
    meta = {k: v for k, v in header.items() if k not in ("entries", "version")}
    layout = [(e["name"], e["kind"], e.get("bits"), e.get("qn")) for e in header["entries"]]
    return {
        "meta": digest(_strip_paths(meta)),
        "layout": digest(sorted(layout, key=str)),
        "weights": digest(exported_state_dict(header, tensors)),
    }


def _strip_paths(obj: Any) -> Any:
    """The export header without the run's folder paths (its metadata holds the source files)."""
    if isinstance(obj, dict):
        return {k: _strip_paths(v) for k, v in obj.items() if k not in PATHS and k != "source"}
    return obj


def kill_run(root: Path, log_dir: Path) -> None:
    """The QT-DoG reference run interrupted before step ``KILL_AT`` (last.pt at step 3)."""
    from dg_quant.adapters.wilds.cli import parse_config
    from dg_quant.adapters.wilds.runner import run
    from dg_quant.hookimpl import hookimpl

    class Kill:
        @hookimpl
        def dgq_step_start(self, step: int) -> None:
            if step == KILL_AT:
                raise KeyboardInterrupt

    config, host = parse_config([*COMMON, *RUNS["qtdog"], "--root_dir", str(root), "--log_dir", str(log_dir)])
    host.register(Kill())
    try:
        run(config, host)
    except KeyboardInterrupt:
        return
    raise AssertionError("the run was not interrupted")


def reference(work: Path) -> dict[str, Any]:
    """Every reference run under ``work``; returns their fingerprints."""
    root = write_image_folders(work / "data", per_class=10, size=12)
    out: dict[str, Any] = {}
    for name in RUNS:
        wilds_run(name, root, work / name)
        out[name] = fingerprint(work / name)
    out["dgq_ptq"] = ptq_fingerprint(work / "erm")
    out["dgq_export"] = export_fingerprint(work / "qtdog", work / "qtdog.dgq")
    return out


def main(argv: list[str]) -> None:
    import tempfile

    dest = Path(argv[0])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (dest / "reference_outputs.json").write_text(json.dumps(reference(work), indent=1, sort_keys=True) + "\n")
        killed = work / "killed"
        kill_run(work / "data", killed)
        old = dest / "old_run_qtdog"
        shutil.rmtree(old, ignore_errors=True)
        old.mkdir(parents=True)
        for name in ("last.pt", "best_model.pt", "config.json", "results.jsonl"):
            shutil.copy(killed / name, old / name)


if __name__ == "__main__":
    main(sys.argv[1:])
