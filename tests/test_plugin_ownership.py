"""Plugins that own the same part of a run (``DGQ_OWNS``) are refused at start-up, in one line."""

from __future__ import annotations

import sys
import types

import pytest

from dg_quant.adapters.wilds.cli import main as wilds_run
from dg_quant.errors import PluginError
from dg_quant.host import PluginHost
from dg_quant.ownership import GRADIENT_COMPUTATION, WEIGHT_QUANTIZATION, owned_parts


@pytest.mark.parametrize(
    ("first", "second", "part"),
    [
        ("dg_quant.qtdog", "dg_quant.inq", WEIGHT_QUANTIZATION),
        ("dg_quant.inq", "dg_quant.obc", WEIGHT_QUANTIZATION),
        ("dg_quant.qtdog", "dg_quant.lsq", WEIGHT_QUANTIZATION),
        ("dg_quant.qtdog", "dg_quant.obc", WEIGHT_QUANTIZATION),
        ("dg_quant.fqat", "dg_quant.lsq", WEIGHT_QUANTIZATION),
        ("dg_quant.fqat", "dg_quant.qtdog", WEIGHT_QUANTIZATION),
        ("dg_quant.fqat", "dg_quant.sagm", GRADIENT_COMPUTATION),
        ("dg_quant.sagm", "dg_quant.fqat", GRADIENT_COMPUTATION),
    ],
)
def test_two_owners_of_one_part_are_refused(first: str, second: str, part: str) -> None:
    with pytest.raises(PluginError) as info:
        PluginHost([first, second])
    message = str(info.value)
    assert "\n" not in message and first in message and second in message and part in message


@pytest.mark.parametrize(
    "plugins",
    [["dg_quant.qtdog", "dg_quant.sagm"], ["dg_quant.lsq", "dg_quant.sagm"], ["dg_quant.sagm", "dg_quant.inq"]],
)
def test_plugins_owning_different_parts_compose(plugins: list[str]) -> None:
    assert PluginHost(plugins).names == plugins


def test_a_third_party_part_and_a_plugin_that_owns_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, owns in (("my_swa", ("weight averaging",)), ("my_ema", "weight averaging"), ("my_loss", None)):
        module = types.ModuleType(name)
        if owns is not None:
            module.DGQ_OWNS = owns
        monkeypatch.setitem(sys.modules, name, module)
    assert owned_parts(sys.modules["my_ema"]) == ("weight averaging",)
    assert PluginHost(["my_loss", "my_swa", "dg_quant.qtdog", "dg_quant.sagm"]).names[0] == "my_loss"
    with pytest.raises(PluginError, match="my_swa and --plugin my_ema .* weight averaging"):
        PluginHost(["my_swa", "my_ema"])


def test_wilds_run_refuses_before_training(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    log_dir = tmp_path / "run"
    code = wilds_run(["-p", "dg_quant.qtdog", "-p", "dg_quant.inq", "--log_dir", str(log_dir), "--n_steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "dg_quant.qtdog" in err[0] and "dg_quant.inq" in err[0]
    assert not log_dir.exists()
