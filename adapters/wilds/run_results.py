"""Reading ``wilds_run`` folders (``final.json``, ``results.jsonl``, ``config.json``, ``dgq_eoq``'s
``eoq.json``) into the host-neutral records that ``dg_quant.results`` and ``dg_quant.analysis``
print and tabulate: only this host knows its files."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dg_quant.errors import DataError
from dg_quant.io import read_jsonl
from dg_quant.results import TEST_METRIC, EnsembleResult, RunResult, bits_label, method_name

RUN_FILES = ("final.json", "results.jsonl")


def load_final(run_dir: str | Path) -> dict[str, Any]:
    """The ``final.json`` of a finished run, or a one-line error naming the folder."""
    path = Path(run_dir) / "final.json"
    if not path.is_file():
        raise DataError(f"{run_dir} has no final.json; is it a finished wilds_run folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} is not valid JSON ({exc.msg}); the run may have been written by another tool"
        ) from None


def find_finished_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Finished run folders among ``paths``: each path is a run folder (with ``final.json``) or a
    folder searched recursively for them, as ``dgq_analyze table`` does."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / "final.json").is_file() or not path.is_dir():
            found.append(path)  # load_final names a missing or broken final.json
            continue
        inner = sorted(p.parent for p in path.rglob("final.json"))
        if not inner:
            raise DataError(f"{path} has no final.json, nor any folder under it; is it a finished wilds_run folder?")
        found.extend(inner)
    return list(dict.fromkeys(found))


def with_config(final: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """``final`` with the run's ``config.json`` under ``config`` (test domain, bit widths)."""
    path = run_dir / "config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        config = {}
    return {**final, "config": config}


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders among ``paths``: each path is a run folder or a folder searched recursively."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path} does not exist; pass run folders or a folder that holds them")
        if any((path / f).is_file() for f in RUN_FILES):
            found.append(path)
            continue
        inner = sorted({p.parent for f in RUN_FILES for p in path.rglob(f)})
        found.extend(inner)
    if not found:
        raise DataError(f"no run folders (with final.json or results.jsonl) under {', '.join(map(str, paths))}")
    return list(dict.fromkeys(found))


def find_ensembles(paths: Iterable[str | Path]) -> list[Path]:
    """``eoq.json`` files of ``dgq_eoq`` folders among or under ``paths``."""
    found = []
    for path in map(Path, paths):
        found += [path / "eoq.json"] if (path / "eoq.json").is_file() else sorted(path.rglob("eoq.json"))
    return list(dict.fromkeys(found))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path} ({type(exc).__name__}); is it a wilds_run result?") from None


def run_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """Evaluation records of a run: ``results.jsonl``, else the two kept in ``final.json``."""
    run_dir = Path(run_dir)
    if (run_dir / "results.jsonl").is_file():
        return read_jsonl(run_dir / "results.jsonl")
    final = _read_json(run_dir / "final.json")
    records = [r for r in (final.get("best"), final.get("last")) if r]
    return sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])


def run_info(run_dir: str | Path, group_by: Sequence[str] = ()) -> dict[str, Any]:
    """dataset, method (plugins plus any ``group_by`` settings), backbone, bit widths, seed, test
    domain and the run's validation and test metrics."""
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else {}
    final = _read_json(run_dir / "final.json") if (run_dir / "final.json").is_file() else {}
    method = method_name({"plugins": final.get("plugins", config.get("plugins"))})
    extras = [f"{key}={config.get(key)}" for key in group_by]
    if extras:
        method = f"{method} ({', '.join(extras)})"
    return {
        "run": str(run_dir),
        "dataset": final.get("dataset", config.get("dataset", "?")),
        "method": method,
        "model": str(final.get("model", config.get("model", "?"))),
        "bits": bits_label(final, config),
        "seed": final.get("seed", config.get("seed", 0)),
        "val_metric": final.get("val_metric", config.get("val_metric", "id_val/acc_avg")),
        "test_metric": final.get("test_metric") or config.get("test_metric") or TEST_METRIC,
        "test_env": config.get("test_domain"),
    }


def read_run(run_dir: str | Path, group_by: Sequence[str] = ()) -> RunResult:
    """One run folder as a record for the tables and the stability curves (``run``: as given)."""
    return RunResult({**run_info(run_dir, group_by), "run": str(run_dir)}, run_records(run_dir))


def read_ensemble(path: str | Path, group_by: Sequence[str] = ()) -> EnsembleResult | None:
    """The ensemble of an ``eoq.json`` (None when its members' folders are gone)."""
    path = Path(path)
    summary = _read_json(path)
    rule = "training_domain" if summary.get("which", "best") == "best" else "last"
    members = [Path(m) for m in summary.get("members", [])]
    if not members or not members[0].exists():
        return None
    seeds = ",".join(str(run_info(m).get("seed")) for m in members if m.exists())
    return EnsembleResult(
        run=str(path.parent),
        info=run_info(members[0], group_by),
        seeds=seeds,
        rule=rule,
        metrics=summary.get("ensemble", {}),
    )


def read_runs(
    paths: Iterable[str | Path], group_by: Sequence[str] = ()
) -> tuple[list[RunResult], list[EnsembleResult]]:
    """The runs and ``dgq_eoq`` ensembles among or under ``paths``, as records for the tables."""
    paths = list(paths)
    runs = [read_run(d, group_by) for d in find_runs(paths)]
    ensembles = [e for e in (read_ensemble(p, group_by) for p in find_ensembles(paths)) if e is not None]
    return runs, ensembles
