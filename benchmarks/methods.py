"""The training methods the harness compares, each a plugin host plus its flags.

Every method is quantized from the first step (``--quant_start_step 0``) so that the timed steps
are the quantized ones. ``sagm`` and ``fqat`` use the project's plugins when they import and
build; otherwise the harness times a SAGM-shaped two-pass step of its own (``two_pass.py``),
and the label says so with a ``*``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from benchmarks.two_pass import TwoPassStep
from dg_quant.context import RunContext
from dg_quant.host import PluginHost


@dataclass(frozen=True)
class Method:
    """How to build one method: plugins, their flags, and the fallback when a plugin is missing."""

    plugins: tuple[str, ...] = ()
    argv: tuple[str, ...] = ()
    fallback_plugins: tuple[str, ...] | None = None
    fallback_argv: tuple[str, ...] = ()
    note: str = ""
    target: float | None = None  # the wall-clock ratio to aim for against FP ERM (a GPU target; see README)
    two_pass: bool = False  # always use the harness's two-pass step (a reference point)
    reference: bool = False  # the pre-fusion path: parametrized weights, eager kernels (before/after)
    kernels: str | None = None  # LSQ kernels of this method whatever --quant-kernel says (eager: the run default)


QUANT_NOW = ("--quant_start_step", "0")
METHODS: dict[str, Method] = {
    "erm": Method(note="full-precision ERM (the baseline)"),
    "qtdog": Method(("dg_quant.qtdog",), ("--bits", "7", *QUANT_NOW), note="7-bit weights", target=1.05),
    "lsq_wa": Method(("dg_quant.lsq",), ("--bits", "4", "--act_bits", "4"), note="W4A4 LSQ, one pass"),
    "sagm": Method(("dg_quant.sagm",), (), fallback_plugins=(), note="FP, two passes"),
    "fqat": Method(
        ("dg_quant.fqat",),
        ("--bits", "4", "--act_bits", "4", *QUANT_NOW),
        fallback_plugins=("dg_quant.lsq",),
        fallback_argv=("--bits", "4", "--act_bits", "4"),
        note="W4A4 + two passes",
        target=2.1,
    ),
    "qtdog_ref": Method(
        ("dg_quant.qtdog",),
        ("--bits", "7", *QUANT_NOW),
        note="qtdog through the reference path (parametrized weights, eager kernels: the code before issue 20)",
        target=1.05,
        reference=True,
    ),
    "fqat_ref": Method(
        ("dg_quant.fqat",),
        ("--bits", "4", "--act_bits", "4", *QUANT_NOW),
        note="fqat through the reference path (parametrized weights, eager kernels: the code before issue 20)",
        target=2.1,
        reference=True,
    ),
    "qtdog_eager": Method(
        ("dg_quant.qtdog",),
        ("--bits", "7", *QUANT_NOW),
        note="qtdog with the eager LSQ kernels (a run's default --quant_kernels eager), fused layers",
        target=1.05,
        kernels="eager",
    ),
    "fqat_eager": Method(
        ("dg_quant.fqat",),
        ("--bits", "4", "--act_bits", "4", *QUANT_NOW),
        note="fqat with the eager LSQ kernels (a run's default --quant_kernels eager), fused layers",
        target=2.1,
        kernels="eager",
    ),
    "wa_2pass": Method(
        ("dg_quant.lsq",),
        ("--bits", "4", "--act_bits", "4"),
        note="W4A4 LSQ + the harness's SAGM-shaped two-pass step (FQAT's cost without its bookkeeping)",
        target=2.1,
        two_pass=True,
    ),
}


@dataclass
class BuiltMethod:
    name: str
    label: str
    host: PluginHost
    config: argparse.Namespace
    note: str


def _host_and_config(plugins: tuple[str, ...], argv: tuple[str, ...]) -> tuple[PluginHost, argparse.Namespace]:
    host = PluginHost(plugins)
    parser = argparse.ArgumentParser(add_help=False)
    host.add_options(parser)
    config, _unknown = parser.parse_known_args(list(argv))  # flags a plugin lacks are ignored
    config.seed = 0
    host.configure(config, RunContext(host="benchmarks", total_steps=10**6))
    return host, config


def build_method(name: str, fallback_reason: str | None = None) -> BuiltMethod:
    """Build ``name``'s host and config, or its stand-in when ``fallback_reason`` is given."""
    method = METHODS[name]
    if fallback_reason is None:
        host, config = _host_and_config(method.plugins, method.argv)
        if method.two_pass:
            host.register(TwoPassStep(), name="benchmarks.two_pass")
        return BuiltMethod(name, name, host, config, method.note)
    if method.fallback_plugins is None:
        raise RuntimeError(f"{name}: {fallback_reason}")
    host, config = _host_and_config(method.fallback_plugins, method.fallback_argv)
    host.register(TwoPassStep(), name="benchmarks.two_pass")
    return BuiltMethod(name, name + "*", host, config, f"{method.note}; stand-in two-pass step ({fallback_reason})")
