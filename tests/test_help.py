"""``--help`` of every command: each flag explained once, no reStructuredText, and ``wilds_run
--help`` without the heavy libraries (it printed after seconds of imports it did not need)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from dg_quant.adapters.wilds import analyze, cli, eoq, export, ptq
from dg_quant.host import BUILTIN_PLUGINS, PluginHost
from dg_quant.options import HelpFormatter

HEAVY = ("wilds", "timm", "transformers", "open_clip", "torchvision")
ALL_PLUGINS = sorted(BUILTIN_PLUGINS)


def test_wilds_run_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import json, sys\n"
        "from dg_quant.adapters.wilds.cli import main\n"
        f"for plugin in {ALL_PLUGINS!r}:\n"
        "    try:\n"
        "        main(['--help', '--plugin', plugin])\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--quant_start_step" in out  # the plugins' flags are there
    assert json.loads(out.strip().splitlines()[-1]) == []


def _wilds_parser(plugins: list[str]) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    PluginHost(plugins).add_options(parser)
    return parser


def _parsers() -> dict[str, argparse.ArgumentParser]:
    found = {
        "wilds_run": _wilds_parser([]),
        "dgq_export": export.build_parser(),
        "dgq_ptq": ptq.build_parser(),
        "dgq_eoq": eoq.build_parser(),
    }
    found.update({f"wilds_run --plugin {p}": _wilds_parser([p]) for p in ALL_PLUGINS})
    top = analyze.build_parser()
    found["dgq_analyze"] = top
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update({f"dgq_analyze {name}": sub for name, sub in action.choices.items()})
    return found


@pytest.mark.parametrize("name", list(_parsers()))
def test_every_flag_has_help_and_at_most_one_default(name: str) -> None:
    parser = _parsers()[name]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    text = parser.format_help()
    assert "``" not in text, f"{name} --help shows reStructuredText"
    assert "(default: None)" not in text and "(default: [])" not in text
    # one "(default" per flag at most (help is wrapped: join the lines of each flag first)
    for entry in text.replace("\n                        ", " ").split("\n  -"):
        assert entry.count("(default") <= 1, entry


def test_formatter_keeps_a_default_that_says_something() -> None:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--a", type=int, default=3, help="three")
    parser.add_argument("--b", default=None, help="preset (dataset preset if unset)")
    parser.add_argument("--c", default="x", help="named (default: x, the usual)")
    text = parser.format_help().replace("\n", " ")
    assert "three (default: 3)" in text and "default: None" not in text and text.count("(default: x") == 1


def test_wilds_run_help_names_the_presets(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "Unset flags take the dataset's preset" in out and "amazon: distilbert, adamw lr 1e-05" in out
    for flag in ("--lr", "--optimizer", "--batch_size", "--seed", "--n_epochs", "--threads"):
        assert flag in out


@pytest.mark.parametrize(
    ("main", "argv", "prog"),
    [
        (cli.main, ["--n_stepz", "3"], "wilds_run"),
        (cli.main, ["--lr", "nan"], "wilds_run"),
        (analyze.main, ["tablex"], "dgq_analyze"),
        (export.main, [], "dgq_export"),
    ],
)
def test_a_usage_error_is_one_line_pointing_at_help(main, argv, prog, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}") and f"(see {prog}" in err, err


def test_dgq_ptq_takes_the_obc_plugins_own_flags() -> None:
    """One spelling: dgq_ptq's quantization flags are dg_quant.obc's (as with wilds_run --plugin dg_quant.obc)."""
    flags = set(ptq.build_parser()._option_string_actions)
    assert {"--bits", "--ptq_method", "--ptq_samples", "--ptq_batch_size", "--ptq_obq_max_cols"} <= flags
    assert not {"--method", "--samples", "--obq_max_cols", "--damp"} & flags


def _every_parser() -> dict[str, argparse.ArgumentParser]:
    from dg_quant.adapters.domainbed import launcher
    from dg_quant.adapters.wilds import sweep

    found = {**_parsers(), "domainbed launcher": launcher.build_parser()}
    top = sweep.build_parser()
    found["dgq_sweep"] = top
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update({f"dgq_sweep {name}": sub for name, sub in action.choices.items()})
    return found


@pytest.mark.parametrize("name", list(_every_parser()))
def test_every_flag_is_spelled_with_underscores_and_help_shows_one_spelling(name: str) -> None:
    parser = _every_parser()[name]
    for action in parser._actions:
        long = [o for o in action.option_strings if o.startswith("--")]
        if isinstance(action, argparse.BooleanOptionalAction):
            long = long[:1]  # argparse's own --no-NAME
        assert all("-" not in o[2:] for o in long), f"{name}: {long}"
    assert "--quant-start-step" not in parser.format_help() and "--act-bits" not in parser.format_help()


def test_every_flag_takes_its_dashed_spelling_too() -> None:
    """Commands written with the old dashed flags (``--act-bits``) still run, with the same settings."""
    from dg_quant.adapters.domainbed import launcher

    parser = _wilds_parser(["dg_quant.qtdog"])
    canonical = [
        "--n_steps",
        "7",
        "--quant_start_step=3",
        "--act_bits",
        "8",
        "--log_dir",
        "x",
        "--qtdog_compat",
        "true",
    ]
    dashed = ["--n-steps", "7", "--quant-start-step=3", "--act-bits", "8", "--log-dir", "x", "--qtdog-compat", "true"]
    assert parser.parse_args(dashed) == parser.parse_args(canonical)
    assert parser.parse_args(dashed).act_bits == 8
    args, rest = launcher.build_parser().parse_known_args(
        ["train", "--no-pretrained", "--test-envs", "0", "--", "--x-y"]
    )
    assert args.no_pretrained and rest == ["--test-envs", "0", "--", "--x-y"]  # DomainBed's flags pass untouched
