"""Plugin options declared once as dataclasses, read by every host.

A plugin declares ``@dataclass class Options`` whose fields carry ``option(...)`` metadata.
The WILDS host turns the fields into command-line flags (``bits`` -> ``--bits``); the DomainBed
host into hyperparameters. ``read_options`` builds the dataclass back from a run's config, so
its ``__post_init__`` validation runs the same way for both hosts.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Container, Sequence
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

# Attribute of a parser listing the options dataclasses added to it (see ``declared_options``).
_DECLARED_ATTR = "_dgq_declared_options"


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    search: Callable[[Any], Any] | None = None,
    type: Callable[[str], Any] | None = None,
) -> Any:
    """A dataclass field that is also a CLI flag and a hyperparameter.

    :param type: how the CLI parses the flag when the default (e.g. None) does not tell.
    :param search: ``f(numpy RandomState) -> value`` for random hyperparameter search; values
        must be plain ``int``/``float``/``str``/``bool`` (JSON-safe).
    """
    metadata = {"help": help, "choices": choices, "search": search, "type": type}
    return dataclasses.field(default=default, metadata=metadata)


def flag(name: str) -> str:
    """The flag of an option field: its name as written (``quant_start_step`` -> ``--quant_start_step``).

    Every dg-quant flag is spelled with underscores, like WILDS' own flags (``--log_dir``) and the
    keys of config files and DomainBed hparams; ``CommandParser`` also accepts the dashed spelling.
    """
    return "--" + name


def respell_flags(args: Sequence[str], known: Container[str]) -> list[str]:
    """``args`` with each ``--a-b`` (or ``--a_b``) that is not a flag but whose other spelling is one
    written as that flag (``--act-bits=4`` -> ``--act_bits=4``); nothing after a bare ``--``.

    This is the hidden alias of every flag: old commands keep working, help shows one spelling.
    """
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if not arg.startswith("--") or len(arg) < 3:
            continue
        name, eq, value = arg.partition("=")
        if name in known:
            continue
        for other in ("--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
            if other in known:
                out[i] = other + eq + value
                break
    return out


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_options(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """Add one flag per field of ``cls`` (``--quant_start_step``; ``CommandParser`` also takes
    ``--quant-start-step``).

    Flags already defined are skipped, so plugins sharing an options class can all add it.
    """
    declared = vars(parser).setdefault(_DECLARED_ATTR, [])
    if cls not in declared:
        declared.append(cls)
    existing = set(parser._option_string_actions)
    fields = [f for f in dataclasses.fields(cls) if flag(f.name) not in existing]
    if not fields:
        return
    group = parser.add_argument_group(title)
    for f in fields:
        default = f.default
        kind = f.metadata.get("type") or (_parse_bool if isinstance(default, bool) else type(default))
        group.add_argument(
            flag(f.name),
            dest=f.name,
            type=kind,
            default=default,
            choices=f.metadata.get("choices"),
            help=_help(f.metadata.get("help", "")),
        )


def _help(text: str) -> str:
    """Help text; one that names its own default (e.g. "same as --bits") keeps argparse's
    ``ArgumentDefaultsHelpFormatter`` from appending "(default: None)" after it."""
    return text + "%(default).0s" if "(default:" in text else text


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` of every dg-quant command: a flag's default is appended only where it says
    something (not ``None``, ``False`` or ``[]``, and not when the help already names its default,
    e.g. "dataset preset if unset"); descriptions keep their line breaks (examples stay readable)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "%(default)" in text or "(default" in text or "if unset" in text:
            return text
        if (
            action.default is None
            or action.default is False
            or action.default == []
            or action.default is argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class CommandParser(argparse.ArgumentParser):
    """The parser of every dg-quant command: a usage error is one line naming the fix, and every
    flag is also accepted in its other spelling (``--act-bits`` for ``--act_bits``, hidden in help).

    argparse prints the whole usage block (30+ lines for ``wilds_run``) above the error, which
    buries it; the pointer to ``--help`` says where the usage is.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        """Parse, after writing each flag given in its other spelling (``--act-bits``) as the flag."""
        args = sys.argv[1:] if args is None else args
        return super().parse_known_args(respell_flags(args, self._option_string_actions), namespace)


def plain_text(doc: str) -> str:
    """A docstring for the terminal: reStructuredText's ``literal`` marks removed."""
    return doc.replace("``", "")


def declared_options(parser: argparse.ArgumentParser) -> list[type]:
    """The options dataclasses added to ``parser`` by ``add_options``, in order.

    The DomainBed host reads their ``search`` samplers to build its random hyperparameter search.
    """
    return list(vars(parser).get(_DECLARED_ATTR, []))


def read_options(cls: type[T], config: Any) -> T:
    """Build ``cls`` from the attributes of ``config`` (missing ones take the field default)."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if hasattr(config, f.name)}
    return cls(**values)


def option_search_space(cls: type) -> dict[str, Callable[[Any], Any] | None]:
    """``{name: sampler}`` of every field (None when the field is not searched).

    The DomainBed host's random hyperparameter search draws from these samplers.
    """
    return {f.name: f.metadata.get("search") for f in dataclasses.fields(cls)}
