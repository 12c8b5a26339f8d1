"""``dgq_sweep``: many ``wilds_run`` runs from one YAML sweep file, launched through submitit.

    dgq_sweep launch sweeps/pacs_cpu.yaml                       # local: this machine
    dgq_sweep launch sweeps/qtdog_pacs.yaml --executor slurm --partition gpu --gpus 1 --time 720
    dgq_sweep status sweeps/qtdog_pacs.yaml                     # done / running / failed / killed
    dgq_analyze table runs/sweeps/qtdog_pacs                    # the results table

A sweep is the product methods x test domains x hyperparameter points x seeds; a hyperparameter
point is one combination of the ``grid`` values, combined with each of ``random.trials`` random
draws. Each point runs ``wilds_run --config <run>/sweep_point.yaml --log_dir <run>`` in its own
deterministic folder ``<output>/<method>/<test_domain>/[<hyperparameters>/]seed<seed>``.
Launching again skips finished runs (``final.json``), resumes killed ones (``--resume`` from their
``last.pt``) and leaves running ones alone. The file format is in docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import os
import re
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dg_quant.errors import ConfigError, DataError, require_optional, run_command
from dg_quant.io import atomic_write_json, atomic_write_text
from dg_quant.options import CommandParser

PROG = "dgq_sweep"
EXECUTORS = ("local", "slurm", "debug")
POINT_FILE = "sweep_point.yaml"
STATE_FILE = "sweep_state.json"
LOG_FILE = "sweep.log"
INDEX_FILE = "sweep_points.json"
SWEEP_KEYS = frozenset({"name", "output", "fixed", "methods", "test_domains", "seeds", "grid", "random", "launcher"})
LAUNCHER_KEYS = frozenset({"executor", "parallel", "partition", "gpus", "time", "cpus", "mem_gb", "slurm"})
# Distributions of the random search: name -> draw(rng, arguments).
DISTRIBUTIONS: dict[str, Callable[[np.random.RandomState, list], Any]] = {
    "uniform": lambda r, a: float(r.uniform(a[0], a[1])),
    "log_uniform": lambda r, a: float(10 ** r.uniform(np.log10(float(a[0])), np.log10(float(a[1])))),
    "int_uniform": lambda r, a: int(r.randint(int(a[0]), int(a[1]) + 1)),
    "choice": lambda r, a: _plain(a[r.randint(len(a))]),
}


@dataclass
class Launcher:
    """Where and how the runs execute: submitit's executor and its resources."""

    executor: str = "local"
    parallel: int = 1  # runs at once (local), Slurm array parallelism
    partition: str | None = None
    gpus: int = 0
    time: int = 60 * 24  # minutes per run
    cpus: int | None = None
    mem_gb: float | None = None
    slurm: dict[str, Any] = field(default_factory=dict)  # extra submitit slurm_* parameters


@dataclass
class Point:
    """One run of the sweep: its folder and every ``wilds_run`` setting."""

    name: str
    settings: dict[str, Any]


@dataclass
class Sweep:
    name: str
    output: Path
    points: list[Point]
    launcher: Launcher


# -- reading the sweep file -------------------------------------------------------------------


def load_spec(path: str | Path) -> dict[str, Any]:
    """The sweep file's mapping; a missing or malformed file is a one-line ``ConfigError``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a mapping with fixed, methods, test_domains, seeds, ...")
    spec.setdefault("name", path.stem)
    return spec


def read_sweep(path: str | Path, output: str | None = None) -> Sweep:
    """The sweep file as points."""
    return build_sweep(load_spec(path), Path(path), output)


def build_sweep(spec: dict[str, Any], path: Path, output: str | None = None) -> Sweep:
    """The points of a sweep spec (the file's mapping); ``path`` names it in errors."""
    _known(spec, SWEEP_KEYS, path, "sweep key")
    name = str(spec.get("name") or path.stem)
    out = Path(output or spec.get("output") or Path("runs") / "sweeps" / name).absolute()
    fixed = _mapping(spec.get("fixed"), path, "fixed")
    methods = spec.get("methods") or {"erm": {}}
    if isinstance(methods, list):  # a list of method names with no settings of their own
        methods = {str(m): {} for m in methods}
    methods = {str(m): _mapping(s, path, f"methods.{m}") for m, s in _mapping(methods, path, "methods").items()}
    domains = spec.get("test_domains") or [None]
    seeds = spec.get("seeds", [0])
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    points = []
    for method, settings in methods.items():
        for hp_tag, hp in hyperparameter_points(spec.get("grid"), spec.get("random"), path):
            for domain in domains:
                for seed in seeds:
                    parts = [method, _slug(domain if domain is not None else "default")]
                    parts += [hp_tag] if hp_tag else []
                    values = {**fixed, **settings, **hp, "seed": seed}
                    if domain is not None:
                        values["test_domain"] = domain
                    points.append(Point("/".join([*parts, f"seed{seed}"]), values))
    launcher = _launcher(spec.get("launcher"), path)
    return Sweep(name, out, points, launcher)


def hyperparameter_points(grid: Any, random: Any, source: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(folder tag, settings) of every grid combination x random trial; ``("", {})`` if neither."""
    grid = _mapping(grid, source, "grid")
    keys = sorted(grid)
    combos = [dict(zip(keys, values)) for values in itertools.product(*(_as_list(grid[k]) for k in keys))]
    random = _mapping(random, source, "random")
    trials = int(random.get("trials", 1)) if random else 0
    ranges = {k: v for k, v in random.items() if k not in ("trials", "seed")}
    for combo in combos:
        grid_tag = "_".join(f"{k}{_slug(v)}" for k, v in combo.items())
        if not ranges:
            yield grid_tag, combo
            continue
        for trial in range(trials):
            drawn = draw(ranges, int(random.get("seed", 0)), trial, source)
            tag = "_".join(t for t in (grid_tag, f"trial{trial}") if t)
            yield tag, {**combo, **drawn}


def draw(ranges: dict[str, Any], seed: int, trial: int, source: Path) -> dict[str, Any]:
    """One random-search trial: each name drawn from its own seeded generator.

    The generator of ``name`` depends only on (seed, name, trial), so adding a range to the
    file leaves the values already drawn for the other names unchanged.
    """
    values = {}
    for name, spec in sorted(ranges.items()):
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(
                f"{source}: random.{name} must be one of "
                f"{', '.join(f'{{{d}: [...]}}' for d in DISTRIBUTIONS)}; got {spec!r}"
            )
        kind, args = next(iter(spec.items()))
        args = _as_list(args)
        if kind != "choice" and len(args) != 2:
            raise ConfigError(f"{source}: random.{name}: {kind} takes [low, high]; got {args!r}")
        digest = hashlib.md5(f"{seed}/{name}/{trial}".encode()).hexdigest()
        values[name] = DISTRIBUTIONS[kind](np.random.RandomState(int(digest[:8], 16)), args)
    return values


def _launcher(spec: Any, source: Path) -> Launcher:
    spec = _mapping(spec, source, "launcher")
    _known(spec, LAUNCHER_KEYS, source, "launcher key")
    launcher = Launcher(**spec)
    if launcher.executor not in EXECUTORS:
        raise ConfigError(f"{source}: launcher.executor {launcher.executor!r}; choose from {', '.join(EXECUTORS)}")
    return launcher


def _known(spec: dict, keys: frozenset[str], source: Path, what: str) -> None:
    import difflib

    for key in spec:
        if key not in keys:
            close = difflib.get_close_matches(str(key), sorted(keys), n=2)
            hint = f"did you mean {' or '.join(close)}?" if close else f"known: {', '.join(sorted(keys))}"
            raise ConfigError(f"{source}: unknown {what} {key!r}; {hint}")


def _mapping(value: Any, source: Path, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {where} must be a mapping (key: value), got {value!r}")
    return {str(k): v for k, v in value.items()}


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _slug(value: Any) -> str:
    text = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
    return re.sub(r"[^A-Za-z0-9_.,=+-]+", "-", text)


# -- one run ----------------------------------------------------------------------------------


def point_argv(run_dir: Path) -> list[str]:
    """The ``wilds_run`` arguments of a point; ``--resume`` when a killed run left ``last.pt``."""
    argv = ["--config", str(run_dir / POINT_FILE), "--log_dir", str(run_dir), "--no_progress"]
    if (run_dir / "last.pt").exists():
        argv.append("--resume")
    return argv


def run_point(run_dir: str) -> int:
    """Run one point (in the submitit job); records its state and its last error line.

    Never raises: a failure is written to ``sweep_state.json`` (and ``sweep.log``), where
    ``dgq_sweep status`` reads it, and returned as the exit status.
    """
    from dg_quant.adapters.wilds.cli import main as wilds_main

    folder = Path(run_dir)
    argv = point_argv(folder)
    _write_state(folder, "running", argv=argv)
    log = io.StringIO()
    rc, error = 1, ""
    try:
        with contextlib.redirect_stderr(_Tee(sys.stderr, log)):
            rc = wilds_main(argv)
    except BaseException as exc:  # noqa: B036 - record any failure, then report it as an exit status
        traceback.print_exc(file=log)
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        rc = 130 if isinstance(exc, KeyboardInterrupt) else 1
    text = log.getvalue()
    with open(folder / LOG_FILE, "a") as f:
        f.write(text)
    if rc == 0:
        _write_state(folder, "done", argv=argv)
    elif rc == 130:  # interrupted: resumable from last.pt
        _write_state(folder, "killed", argv=argv, rc=rc)
    else:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        _write_state(folder, "failed", argv=argv, rc=rc, error=error or (lines[-1] if lines else f"exit {rc}"))
    return rc


class _Tee(io.TextIOBase):
    """Writes to two streams: the job's own stderr and the run's ``sweep.log``."""

    def __init__(self, *streams: io.TextIOBase) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


def _write_state(folder: Path, state: str, **extra: Any) -> None:
    job_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{job_id}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if job_id else os.environ.get("SLURM_JOB_ID")
    atomic_write_json(
        folder / STATE_FILE,
        {
            "state": state,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": time.time(),
            "job_id": job_id,
            **extra,
        },
    )


# -- status -----------------------------------------------------------------------------------


def point_status(run_dir: Path) -> tuple[str, str]:
    """(state, detail): done, running, failed, killed (resumable) or pending."""
    if (run_dir / "final.json").is_file():
        return "done", ""
    state = _read_json(run_dir / STATE_FILE)
    progress = _progress(run_dir)
    if state.get("state") == "failed":
        return "failed", str(state.get("error", ""))
    if state.get("state") == "killed":
        return "killed", progress
    if state.get("state") == "queued":
        return "running", f"queued (Slurm job {state.get('job_id')})"
    if state.get("state") == "running":
        if state.get("host") == socket.gethostname() and not _alive(int(state.get("pid", -1))):
            return "killed", progress
        job = f" (Slurm job {state['job_id']})" if state.get("job_id") else ""
        return "running", progress + job
    if (run_dir / "last.pt").exists():
        return "killed", progress
    return "pending", ""


def _progress(run_dir: Path) -> str:
    config = _read_json(run_dir / "config.json")
    results = run_dir / "results.jsonl"
    lines = results.read_text().splitlines() if results.is_file() else []
    step = json.loads(lines[-1]).get("step", 0) if lines else 0
    return f"step {step}/{config.get('total_steps', '?')}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_status(sweep: Sweep) -> dict[str, list[tuple[str, str]]]:
    """Points by state: ``{"done": [(name, detail), ...], "failed": [...], ...}``."""
    by_state: dict[str, list[tuple[str, str]]] = {s: [] for s in ("done", "running", "failed", "killed", "pending")}
    for point in sweep.points:
        state, detail = point_status(sweep.output / point.name)
        by_state[state].append((point.name, detail))
    return by_state


def format_status(sweep: Sweep, by_state: dict[str, list[tuple[str, str]]]) -> str:
    counts = ", ".join(f"{len(v)} {k}" for k, v in by_state.items())
    lines = [f"{sweep.name}: {len(sweep.points)} runs in {sweep.output}: {counts}"]
    for state in ("failed", "killed", "running"):
        for name, detail in by_state[state]:
            lines.append(f"  {state:<8} {name}  {detail}".rstrip())
    if by_state["killed"] or by_state["failed"] or by_state["pending"]:
        lines.append(
            f"  launch again to run the pending, resume the killed and retry the failed: {PROG} launch {sweep.output}"
        )
    if by_state["done"]:
        lines.append(f"  table: dgq_analyze table {sweep.output}")
    return "\n".join(lines)


# -- launching ----------------------------------------------------------------------------------


def check_settings(settings: dict[str, Any], label: str = "") -> None:
    """Parse a point's settings as ``wilds_run`` would, so that a bad key fails at launch, not in a job."""
    import tempfile

    from dg_quant.adapters.wilds.cli import parse_config

    prefix = f"{label}: " if label else ""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / POINT_FILE
        path.write_text(yaml.safe_dump(settings))
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                parse_config(["--config", str(path), "--log_dir", tmp])
        except SystemExit:
            lines = err.getvalue().strip().splitlines() or ["invalid settings"]
            raise ConfigError(prefix + lines[-1].replace(str(path), "settings")) from None
        except ConfigError as exc:
            raise ConfigError(prefix + str(exc).replace(str(path), "settings")) from None


def prepare(sweep: Sweep) -> list[Point]:
    """Check and write every point's settings file; return the points to launch (not done or running)."""
    for point in sweep.points:
        check_settings(point.settings, point.name)
    sweep.output.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sweep.output / INDEX_FILE, {"name": sweep.name, "points": [p.name for p in sweep.points]})
    todo = []
    for point in sweep.points:
        run_dir = sweep.output / point.name
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / POINT_FILE, yaml.safe_dump(point.settings, sort_keys=True))
        state, _ = point_status(run_dir)
        if state not in ("done", "running"):
            todo.append(point)
    return todo


def make_executor(sweep: Sweep):
    """A submitit executor for the sweep's launcher settings."""
    submitit = require_optional("submitit")
    launcher = sweep.launcher
    folder = sweep.output / ".submitit" / "%j"
    if launcher.executor == "debug":
        return submitit.DebugExecutor(folder=folder)
    if launcher.executor == "local":
        executor = local_executor(sweep.output / ".submitit", launcher.time)
        executor.update_parameters(gpus_per_node=launcher.gpus)
        return executor
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    except RuntimeError as exc:  # submitit looks for srun
        raise ConfigError(f"--executor slurm: {exc}; launch from a Slurm login node, or use --executor local") from None
    params: dict[str, Any] = {
        "timeout_min": launcher.time,
        "gpus_per_node": launcher.gpus,
        "slurm_array_parallelism": launcher.parallel,
        "name": f"dgq_{sweep.name}",
        "nodes": 1,
        "tasks_per_node": 1,
    }
    if launcher.partition:
        params["slurm_partition"] = launcher.partition
    if launcher.cpus:
        params["cpus_per_task"] = launcher.cpus
    if launcher.mem_gb:
        params["mem_gb"] = launcher.mem_gb
    params.update({k if k.startswith("slurm_") else f"slurm_{k}": v for k, v in launcher.slurm.items()})
    executor.update_parameters(**params)
    return executor


def launch(sweep: Sweep, poll_s: float = 2.0) -> dict[str, list[tuple[str, str]]]:
    """Launch every point that is not finished; wait for local and debug jobs, not for Slurm's."""
    todo = prepare(sweep)
    skipped = len(sweep.points) - len(todo)
    resumed = sum((sweep.output / p.name / "last.pt").exists() for p in todo)
    print(
        f"{PROG}: {sweep.name}: {len(sweep.points)} runs, launching {len(todo)} "
        f"({resumed} resumed), {skipped} finished or running",
        file=sys.stderr,
    )
    dirs = [str(sweep.output / p.name) for p in todo]
    if not dirs:
        return sweep_status(sweep)
    executor = make_executor(sweep)
    if sweep.launcher.executor == "slurm":
        jobs = executor.map_array(run_point, dirs)
        for run_dir, job in zip(dirs, jobs):  # so that a launch before they start does not submit them again
            _write_state(Path(run_dir), "queued", job_id=job.job_id)
        print(
            f"{PROG}: submitted Slurm array {jobs[0].job_id.split('_')[0] if jobs else '-'}; "
            f"watch it with: {PROG} status {sweep.output}",
            file=sys.stderr,
        )
    else:
        run_waves(executor, run_point, dirs, max(sweep.launcher.parallel, 1), poll_s)
    return sweep_status(sweep)


def run_waves(
    executor: Any, fn: Callable[[Any], Any], items: Sequence[Any], parallel: int, poll_s: float = 2.0
) -> list[Any]:
    """``fn(item)`` as submitit jobs, at most ``parallel`` at once (the local executor would start
    them all); the jobs' results in the order of ``items``."""
    pending, running, results = list(enumerate(items)), [], [None] * len(items)
    try:
        while pending or running:
            while pending and len(running) < parallel:
                i, item = pending.pop(0)
                running.append((i, executor.submit(fn, item)))
            finished = [(i, job) for i, job in running if job.done()]
            for i, job in finished:
                running.remove((i, job))
                results[i] = job.result()
            if running and not finished:
                time.sleep(poll_s)
    except KeyboardInterrupt:  # Ctrl-C: stop the jobs too (their runs resume from last.pt next time)
        for _, job in running:
            job.cancel(check=False)
        raise
    return results


def local_executor(folder: Path, minutes: int = 60 * 24 * 7):
    """submitit's executor for jobs on this machine (one process each)."""
    submitit = require_optional("submitit")
    executor = submitit.LocalExecutor(folder=folder / "%j")
    executor.update_parameters(timeout_min=minutes)
    return executor


def wilds_job(argv: list[str]) -> int:
    """One ``wilds_run`` in a submitit job (``dgq_eoq``'s members); its exit status.

    One thread unless ``OMP_NUM_THREADS`` says otherwise, so parallel jobs do not oversubscribe.
    """
    import torch

    from dg_quant.adapters.wilds.cli import main as wilds_main

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    try:
        return wilds_main(argv)
    except Exception:  # a crash is this job's failure, reported by its exit status; the log has the traceback
        traceback.print_exc()
        return 1


# -- command line -------------------------------------------------------------------------------


def _resolve(target: str, output: str | None) -> tuple[dict[str, Any], Path, str | None]:
    """(spec, file, output) from a sweep file, or from an output folder an earlier launch wrote."""
    path = Path(target)
    if path.is_dir():
        sweep_file = path / "sweep.yaml"
        if not sweep_file.is_file():
            raise DataError(f"{path} holds no sweep.yaml; pass the sweep file or a folder {PROG} launched into")
        return load_spec(sweep_file), sweep_file, output or str(path)
    return load_spec(path), path, output


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (values read as YAML: ``lr=1e-4``, ``plugin=[dg_quant.qtdog]``)."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. root_dir=/data)")
        values[key.strip()] = yaml.safe_load(value)
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser(
        "launch",
        help="run every point that is not finished (resumes killed ones)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    go.add_argument("sweep", help="sweep file (YAML), or a folder launched into before")
    go.add_argument(
        "--output", default=None, help="output folder (default: the file's output, else runs/sweeps/<name>)"
    )
    go.add_argument(
        "--executor",
        choices=EXECUTORS,
        default=None,
        help="local: this machine; slurm: a cluster; debug: in this process (default: the file's, else local)",
    )
    go.add_argument("--parallel", type=int, default=None, help="runs at once (local) or Slurm array parallelism")
    go.add_argument("--partition", default=None, help="Slurm partition")
    go.add_argument("--gpus", type=int, default=None, help="GPUs per run")
    go.add_argument("--time", type=int, default=None, help="minutes per run (Slurm time limit)")
    go.add_argument("--cpus", type=int, default=None, help="CPUs per run (Slurm)")
    go.add_argument("--mem_gb", type=float, default=None, help="memory per run in GB (Slurm)")
    go.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override or add fixed wilds_run settings (e.g. root_dir=/data weights=/w.pth); saved with the sweep",
    )
    go.add_argument("--dry_run", action="store_true", help="list the runs and their state, launch nothing")
    st = sub.add_parser("status", help="done / running / failed / killed / pending runs")
    st.add_argument("sweep", help="sweep file (YAML), or the sweep's output folder")
    st.add_argument("--output", default=None, help="output folder, if not the file's")
    return parser


def cmd_launch(args: argparse.Namespace) -> None:
    spec, path, output = _resolve(args.sweep, args.output)
    if args.set:
        spec["fixed"] = {**(spec.get("fixed") or {}), **parse_sets(args.set)}
    sweep = build_sweep(spec, path, output)
    for key in ("executor", "parallel", "partition", "gpus", "time", "cpus", "mem_gb"):
        if getattr(args, key) is not None:
            setattr(sweep.launcher, key, getattr(args, key))
    if args.dry_run:
        for point in sweep.points:
            state, detail = point_status(sweep.output / point.name)
            print(f"{state:<8} {point.name}  {json.dumps(point.settings, sort_keys=True)}")
        return
    sweep.output.mkdir(parents=True, exist_ok=True)
    # the sweep as launched (with --set values), so `launch`/`status OUTPUT` find it again
    atomic_write_text(
        sweep.output / "sweep.yaml", yaml.safe_dump({**spec, "output": str(sweep.output)}, sort_keys=False)
    )
    print(format_status(sweep, launch(sweep)))


def cmd_status(args: argparse.Namespace) -> None:
    spec, path, output = _resolve(args.sweep, args.output)
    sweep = build_sweep(spec, path, output)
    print(format_status(sweep, sweep_status(sweep)))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(PROG, lambda: {"launch": cmd_launch, "status": cmd_status}[args.command](args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; launch again to resume the unfinished runs", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
