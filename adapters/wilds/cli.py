"""``wilds_run``: train on a WILDS dataset with dg-quant plugins, WILDS-example style flags.

    wilds_run                                       # ERM on the embedded rotated digits
    wilds_run --plugin dg_quant.qtdog --bits 7      # QT-DoG on the same data
    wilds_run -d pacs --root_dir DATA --test_domain sketch        # DomainBed-layout folders
    wilds_run -d camelyon17 --root_dir DATA                       # WILDS' own loader and metrics
    wilds_run --config run.yaml --seed 1                          # settings from a file, flags win

``--plugin`` is read first (like pytest's ``-p``) so that plugins can add their own flags.
"""

from __future__ import annotations

import argparse
import math
import shlex
import signal
import sys
from collections.abc import Sequence

from dg_quant.adapters.wilds.config_file import config_argv, file_plugins, read_config_file
from dg_quant.adapters.wilds.datasets import DEFAULT_DATASET
from dg_quant.adapters.wilds.loggers import LOGGERS
from dg_quant.adapters.wilds.presets import apply_preset
from dg_quant.adapters.wilds.run_folder import default_log_dir
from dg_quant.adapters.wilds.transforms import TRANSFORMS
from dg_quant.errors import run_command
from dg_quant.host import PluginHost, known_plugins
from dg_quant.options import CommandParser, HelpFormatter
from dg_quant.results import format_run

PROG = "wilds_run"


def _plugin_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--plugin", "-p", action="append", default=[], metavar="NAME")
    parser.add_argument("--config", default=None)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The host's own flags; plugins add theirs through ``dgq_add_options``."""
    parser = CommandParser(
        prog=PROG,
        description="Train and evaluate on a WILDS dataset with dg-quant plugins (quantization, flatness).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--plugin",
        "-p",
        action="append",
        default=[],
        metavar="NAME",
        help=f"method plugin to load (repeatable); known: {', '.join(known_plugins())}; none means ERM",
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="YAML (or a run's config.json) of settings, keys named as the flags; "
        "flags on the command line override it",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        "-d",
        default=DEFAULT_DATASET,
        help="dataset: rotated_digits (embedded); pacs, vlcs, office_home, terra_incognita, "
        "domain_net or image_folder (DomainBed layout); camelyon17, amazon, ... (WILDS)",
    )
    data.add_argument(
        "--root_dir", default="data", help="folder that holds the dataset folders (camelyon17_v1.0/, PACS/, ...)"
    )
    data.add_argument("--download", action="store_true", help="download the dataset if missing (needs internet)")
    data.add_argument("--split_scheme", default=None, help="WILDS split scheme (dataset default if unset)")
    data.add_argument("--groupby_fields", nargs="+", default=None, help="metadata fields that define groups")
    data.add_argument(
        "--test_domain", default=None, help="held-out domain(s), comma separated, for leave-domain-out datasets"
    )
    data.add_argument(
        "--holdout_fraction", type=float, default=0.2, help="fraction of each domain held out for validation"
    )
    data.add_argument("--split_seed", type=int, default=0, help="seed of the train/validation split")
    data.add_argument("--frac", type=float, default=1.0, help="fraction of each split to use (quick runs)")
    data.add_argument("--eval_splits", nargs="+", default=None, help="splits to evaluate (default: all but train)")
    data.add_argument("--num_workers", type=int, default=0, help="data loader worker processes")
    data.add_argument(
        "--transform",
        choices=TRANSFORMS,
        default=None,
        help="input transform: DomainBed's augmentation, WILDS' resize, the backbone's own "
        "(tokenizer) or none (dataset preset if unset)",
    )
    data.add_argument("--image_size", type=int, default=None, help="image side in pixels for the transform")
    data.add_argument(
        "--max_token_length", type=int, default=None, help="tokenizer length for text backbones that take one"
    )
    data.add_argument(
        "--train_loader",
        choices=("standard", "group"),
        default=None,
        help="WILDS training loader: shuffled, or n_groups_per_batch groups per batch",
    )
    data.add_argument("--n_groups_per_batch", type=int, default=None, help="groups per batch (group loader)")
    data.add_argument(
        "--uniform_over_groups",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sample groups uniformly rather than by size (loader default if unset)",
    )

    model = parser.add_argument_group("model and optimisation", preset_summary())
    model.add_argument(
        "--model",
        default=None,
        help="backbone: a bundled name (resnet50, mobilenet_v2, ...), an entry point of the group "
        "dg_quant.backbones, or package.module:factory (docs/backbones.md); dataset preset if unset",
    )
    model.add_argument(
        "--weights",
        default=None,
        help="pretrained weights: a local file (or model folder), or 'default' for the library's "
        "own, found in its cache or an installed weights package before any download",
    )
    model.add_argument(
        "--optimizer",
        choices=("adam", "adamw", "sgd"),
        default=None,
        help="optimizer (dataset preset if unset); adamw skips decay on biases and LayerNorm",
    )
    model.add_argument("--lr", type=float, default=None, help="learning rate (dataset preset if unset)")
    model.add_argument("--weight_decay", type=float, default=None, help="weight decay (dataset preset if unset)")
    model.add_argument("--momentum", type=float, default=None, help="SGD momentum (dataset preset if unset)")
    model.add_argument(
        "--batch_size", type=int, default=None, help="training examples per step (dataset preset if unset)"
    )
    model.add_argument(
        "--eval_batch_size", type=int, default=None, help="examples per evaluation batch (if unset: twice --batch_size)"
    )
    model.add_argument(
        "--n_epochs",
        type=int,
        default=None,
        help="passes over the training split (dataset preset if unset; --n_steps wins)",
    )
    model.add_argument(
        "--n_steps",
        type=int,
        default=None,
        help="train for this many steps (overrides epochs; dataset preset if unset)",
    )
    model.add_argument("--max_grad_norm", type=float, default=None, help="clip the gradient norm to this")
    model.add_argument(
        "--scheduler",
        choices=("none", "linear"),
        default=None,
        help="learning-rate schedule: constant, or linear decay to 0 (no warmup)",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--eval_every",
        type=int,
        default=None,
        help="evaluate every N steps (if unset: the preset's, else once per epoch, or 5 times in a run given in steps)",
    )
    run.add_argument("--val_metric", default=None, help="'<split>/<metric>' used to pick the best checkpoint")
    run.add_argument(
        "--test_metric", default=None, help="'<split>/<metric>' reported at the best-validation and the last checkpoint"
    )
    run.add_argument(
        "--group_logging",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep per-group accuracies in results.jsonl",
    )
    run.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the model initialisation and the data order (not of the split: --split_seed)",
    )
    run.add_argument(
        "--log_dir",
        default=None,
        help="output folder, locked while the run lives (default: "
        "runs/<dataset>[_<test_domain>]_<model>_<method>[_w<bits>]_seed<seed>)",
    )
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    run.add_argument(
        "--save_every",
        type=int,
        default=None,
        help="also write last.pt every N training steps (0: only at evaluations; dataset preset if unset)",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue from log_dir/last.pt; every setting that changes results must be the same",
    )
    run.add_argument(
        "--logger",
        nargs="+",
        choices=LOGGERS,
        default=[],
        help="also write every results.jsonl record to TensorBoard (log_dir/tensorboard), Weights & Biases "
        "(log_dir/wandb, offline unless WANDB_MODE is set) and/or CSV (log_dir/results.csv)",
    )
    run.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    run.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (if unset: $OMP_NUM_THREADS, else the CPUs this process may "
        "use minus the machine's load, at least 1; see docs/wilds.md)",
    )
    return parser


def preset_summary() -> str:
    """One line per dataset preset: what the unset flags of this group become."""
    from dg_quant.adapters.wilds.presets import PRESETS

    lines, seen = ["Unset flags take the dataset's preset:"], {}
    for name, p in PRESETS.items():
        seen.setdefault(p, []).append(name)
    for p, names in seen.items():
        length = f"{p.n_steps} steps" if p.n_steps else f"{p.n_epochs} epochs"
        every = f", eval every {p.eval_every}" if p.eval_every else ""
        lines.append(
            f"  {', '.join(names)}: {p.model}, {p.optimizer} lr {p.lr:g}, weight decay "
            f"{p.weight_decay:g}, batch {p.batch_size}, {length}{every}"
        )
    return "\n".join(lines)


def parse_config(argv: Sequence[str] | None) -> tuple[argparse.Namespace, PluginHost]:
    """Load the plugins named in ``argv``, then parse every flag into one config."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = _plugin_parser().parse_known_args(argv)
    values = read_config_file(pre.config) if pre.config else {}
    host = PluginHost([*file_plugins(values), *pre.plugin])
    parser = build_parser()
    host.add_options(parser)
    config = parser.parse_args(config_argv(values, parser, pre.config) + argv)
    apply_preset(config, config.dataset)
    _check(config, parser)
    if config.log_dir is None:
        config.log_dir = default_log_dir(config, host.names)
    return config, host


def _check(config: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    positive = {
        "batch_size": config.batch_size,
        "lr": config.lr,
        "n_steps": config.n_steps or 1,
        "n_epochs": config.n_epochs or 1,
        "eval_every": config.eval_every or 1,
        "image_size": config.image_size or 1,
        "n_groups_per_batch": config.n_groups_per_batch,
        "max_token_length": config.max_token_length or 1,
    }
    for name, value in positive.items():
        if value is not None and value <= 0:
            parser.error(f"--{name} must be positive; got {value}")
    if not 0 < config.frac <= 1:
        parser.error(f"--frac must be in (0, 1]; got {config.frac}")
    for name, value in vars(config).items():
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"--{name} must be a finite number; got {value}")
    if config.save_every is not None and config.save_every < 0:
        parser.error(f"--save_every must be 0 (only at evaluations) or positive; got {config.save_every}")


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> None:
        config, host = parse_config(argv)
        from dg_quant.adapters.wilds.runner import run  # heavy imports after the flags are checked
        from dg_quant.threads import apply_threads

        apply_threads(config.threads)

        final = run(config, host)
        if final:  # under torchrun only rank 0 reports (distributed.py)
            print(format_run(final))

    try:
        return run_command(PROG, body)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; continue with --resume", file=sys.stderr)
        return 130
    except BaseException as exc:
        if type(exc).__name__ != "Terminated":  # adapters.wilds.stopping, not imported before a run
            raise
        print(f"{PROG}: {exc}; last.pt is saved; continue with: {resume_command(argv)}", file=sys.stderr)
        return 128 + signal.SIGTERM


def resume_command(argv: Sequence[str] | None) -> str:
    """The command line that continues this run (``--resume`` added once)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join([PROG, *args])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
