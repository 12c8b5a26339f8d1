"""``python -m dg_quant.adapters.domainbed train|sweep|collect_results <DomainBed flags>``.

Registers the dg-quant algorithms, then runs DomainBed's own script from the user's checkout in
this process. A sweep's jobs are ``python -m domainbed.scripts.train ...`` subprocesses, which
would not see the registration; the launcher rewrites each job command to come back through
this entry point (for every command launcher, ``local``, ``multi_gpu`` or a cluster's own), so
the job directories, ``results.jsonl`` and ``collect_results`` stay DomainBed's. After ``train``
returns, the launcher runs the plugins' end of training (``finish.finish_training``), which
sweep jobs get too since they come back through ``train``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import json
import runpy
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from dg_quant.adapters.domainbed.records import (
    RANDOM_INIT_HPARAM,
    RANDOM_INIT_SUFFIX,
    filter_collected_records,
)
from dg_quant.adapters.domainbed.weights import check_backbone_weights, random_init_backbones
from dg_quant.errors import ConfigError, run_command
from dg_quant.options import CommandParser

PROG = "python -m dg_quant.adapters.domainbed"
SCRIPTS = {
    "train": "domainbed.scripts.train",
    "sweep": "domainbed.scripts.sweep",
    "collect_results": "domainbed.scripts.collect_results",
}
LIST_COMMAND = "algorithms"
# How DomainBed's sweep.py starts a job (``Job.command_str``).
TRAIN_COMMAND = "python -m domainbed.scripts.train"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog=PROG,
        add_help=False,
        allow_abbrev=False,
        description="Register dg-quant's algorithms (QTDoG, LSQ, ...) and run a DomainBed script. "
        "Every flag not listed here goes to the script (see its --help).",
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=(*SCRIPTS, LIST_COMMAND),
        help=f"the DomainBed script to run, or {LIST_COMMAND}: list the algorithm names the launcher accepts",
    )
    parser.add_argument(
        "--domainbed",
        metavar="PATH",
        help="root of the DomainBed checkout (the folder holding domainbed/); "
        "default: wherever `import domainbed` finds it (current folder, PYTHONPATH)",
    )
    parser.add_argument(
        "--no_pretrained",
        dest="no_pretrained",
        action="store_true",
        help="build DomainBed's backbones (torchvision, timm, torch.hub) with random weights "
        "instead of ImageNet ones (offline machines, smoke tests; never for reported "
        "numbers): the runs get hparams dgq_random_init=true and collect_results lists "
        "them as '<algorithm> (random init)'",
    )
    parser.add_argument(
        "--data_workers",
        dest="data_workers",
        type=int,
        metavar="N",
        default=None,
        help="data-loading worker processes of every DomainBed dataset (its N_WORKERS, 8 by default; "
        "0 loads in the training process: small machines, CPU runs); sweep jobs get it too",
    )
    return parser


def set_data_workers(datasets: ModuleType, workers: int) -> list[str]:
    """Give every dataset class of DomainBed's ``datasets`` module that defines ``N_WORKERS``
    (``train.py`` builds its loaders with it) ``workers`` instead; returns the classes changed."""
    changed = []
    for name, cls in vars(datasets).items():
        if isinstance(cls, type) and "N_WORKERS" in vars(cls):
            cls.N_WORKERS = workers
            changed.append(name)
    return changed


def locate_domainbed(path: str | None) -> Path:
    """The checkout root holding ``domainbed/``, put first on ``sys.path`` when given."""
    if path is not None:
        root = Path(path).expanduser().resolve()
        if root.name == "domainbed" and (root / "algorithms.py").is_file():
            root = root.parent
        if not (root / "domainbed" / "algorithms.py").is_file():
            raise ConfigError(
                f"--domainbed {path}: no domainbed/algorithms.py there; give the root of a "
                "DomainBed checkout (git clone https://github.com/facebookresearch/DomainBed)"
            )
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        return root
    spec = importlib.util.find_spec("domainbed")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "cannot import domainbed: run from a DomainBed checkout, put it on PYTHONPATH, or pass --domainbed PATH"
        )
    return Path(next(iter(spec.submodule_search_locations))).resolve().parent


def job_prefix(root: Path, no_pretrained: bool, data_workers: int | None = None) -> str:
    """The command that replaces ``python -m domainbed.scripts.train`` in sweep jobs."""
    words = [sys.executable, "-m", "dg_quant.adapters.domainbed", "train", "--domainbed", str(root)]
    if no_pretrained:
        words.append("--no_pretrained")
    if data_workers is not None:
        words += ["--data_workers", str(data_workers)]
    return " ".join(shlex.quote(w) for w in words)


def rewrite_command(command: str, prefix: str) -> str:
    """Send one of sweep.py's job commands through ``prefix``; other commands pass unchanged."""
    if command.startswith(TRAIN_COMMAND + " ") or command == TRAIN_COMMAND:
        return prefix + command[len(TRAIN_COMMAND) :]
    return command


def route_sweep_jobs(registry: dict[str, Callable[[list[str]], Any]], prefix: str) -> None:
    """Wrap every command launcher in ``registry`` so that its jobs run through ``prefix``."""
    for name, launch in list(registry.items()):
        registry[name] = functools.partial(_launch_rewritten, launch, prefix)


def _launch_rewritten(launch: Callable[[list[str]], Any], prefix: str, commands: list[str]) -> Any:
    return launch([rewrite_command(c, prefix) for c in commands])


def _hparams_position(args: list[str]) -> tuple[int | None, dict[str, Any]]:
    """Index of the ``--hparams`` value in ``args`` (None if absent) and its JSON."""
    for i, word in enumerate(args):
        if word == "--hparams" and i + 1 < len(args):
            return i + 1, json.loads(args[i + 1] or "{}")
        if word.startswith("--hparams="):
            return i, json.loads(word.split("=", 1)[1] or "{}")
    return None, {}


def mark_random_init(script_args: Sequence[str], no_pretrained: bool) -> tuple[list[str], bool]:
    """(script args, random init?): with ``--no_pretrained``, ``--hparams`` gains
    ``dgq_random_init: true``, so every record, ``model.pkl`` and sweep job hash carry it; a
    ``--hparams`` that carries it (a sweep job) asks for random weights by itself."""
    args = list(script_args)
    try:
        index, hparams = _hparams_position(args)
    except json.JSONDecodeError:
        return args, no_pretrained  # the script reports its own bad --hparams
    if hparams.get(RANDOM_INIT_HPARAM):
        return args, True
    if not no_pretrained:
        return args, False
    text = json.dumps({**hparams, RANDOM_INIT_HPARAM: True}, sort_keys=True)
    if index is None:
        args += ["--hparams", text]
    elif args[index].startswith("--hparams="):
        args[index] = f"--hparams={text}"
    else:
        args[index] = text
    return args, True


def run_script(
    command: str,
    script_args: Sequence[str],
    domainbed: str | None,
    no_pretrained: bool,
    data_workers: int | None = None,
) -> None:
    """Register the algorithms and run DomainBed's ``command`` script with ``script_args``."""
    if data_workers is not None and data_workers < 0:
        raise ConfigError(f"--data_workers must be >= 0; got {data_workers}")
    root = locate_domainbed(domainbed)
    from dg_quant.adapters.domainbed import register
    from dg_quant.adapters.wilds_compat import import_wilds

    import_wilds()  # domainbed.datasets imports wilds: no network version check, no torch_scatter
    random_init = False
    if command in ("train", "sweep"):
        script_args, random_init = mark_random_init(script_args, no_pretrained)
    if random_init:
        print(
            f"dg-quant: --no_pretrained: backbones start from RANDOM weights, not ImageNet ones; the runs carry "
            f"hparams {RANDOM_INIT_HPARAM}=true and collect_results lists them as "
            f"'<algorithm>{RANDOM_INIT_SUFFIX}' (never report these numbers)",
            file=sys.stderr,
            flush=True,
        )
    register()
    if data_workers is not None and command == "train":
        set_data_workers(importlib.import_module("domainbed.datasets"), data_workers)
    if command == "train" and not random_init:
        saved_argv = sys.argv
        sys.argv = [SCRIPTS[command], *script_args]  # the run length and hparams come from train.py's flags
        try:
            check_backbone_weights(script_args)
        finally:
            sys.argv = saved_argv
    if command == "sweep":
        launchers = importlib.import_module("domainbed.command_launchers")
        route_sweep_jobs(launchers.REGISTRY, job_prefix(root, no_pretrained, data_workers))
    if command == "collect_results":
        filter_collected_records(importlib.import_module("domainbed.lib.reporting"))
    module = SCRIPTS[command]
    saved_argv = sys.argv
    sys.argv = [module, *script_args]
    try:
        with random_init_backbones() if random_init else contextlib.nullcontext():
            namespace = runpy.run_module(module, run_name="__main__", alter_sys=True)
            if command == "train":  # DomainBed has no end-of-training callback: run the plugins' here
                from dg_quant.adapters.domainbed.finish import finish_training

                finish_training(namespace)
    finally:
        sys.argv = saved_argv


def list_algorithms(domainbed: str | None) -> None:
    """Print DomainBed's algorithms, dg-quant's, and every ``<Algorithm>_<Method>`` (refused ones with why)."""
    locate_domainbed(domainbed)
    from dg_quant.adapters.domainbed import register
    from dg_quant.adapters.domainbed.compose import COMPOSABLE, composed_names
    from dg_quant.adapters.wilds_compat import import_wilds

    import_wilds()
    algorithms = importlib.import_module("domainbed.algorithms")
    own = register()
    print("DomainBed (a default sweep runs these):", " ".join(n for n in algorithms.ALGORITHMS if n not in own))
    print("dg-quant (a default sweep runs these too):", " ".join(own))
    names = composed_names(algorithms)
    print(f"composed, <Algorithm>_<Method> with Method in {', '.join(COMPOSABLE)} (name them in --algorithms):")
    for name, reason in names.items():
        print(f"  {name}" + (f"  (not available: {reason})" if reason else ""))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr if rest else sys.stdout)
        return 0 if not rest or rest[0] in ("-h", "--help") else 2
    if args.command == LIST_COMMAND:
        return run_command(PROG, lambda: list_algorithms(args.domainbed))
    try:
        return run_command(
            PROG, lambda: run_script(args.command, rest, args.domainbed, args.no_pretrained, args.data_workers)
        )
    except SystemExit as exc:  # DomainBed's scripts exit through argparse or exit()
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
