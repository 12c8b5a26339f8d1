"""``wilds_run --config``: settings from a file, flags win, a run's config.json repeats the run."""

from __future__ import annotations

import json

import pytest
import torch

from dg_quant.adapters.wilds.cli import main, parse_config

RUN_YAML = """\
# QT-DoG on the embedded digits, a few steps
plugin: [dg_quant.qtdog]
bits: 6
quant_start_step: 2
n_steps: 4
eval_every: 2
lr: 1e-3            # YAML reads this as a string: argparse's float() converts it
group_logging: false
no_progress: true
device: cpu
"""


def _last(log_dir):
    return json.loads((log_dir / "final.json").read_text())["last"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("config")
    (folder / "run.yaml").write_text(RUN_YAML)
    log_dir = folder / "first"
    assert main(["--config", str(folder / "run.yaml"), "--bits", "5", "--log_dir", str(log_dir)]) == 0
    return log_dir


def test_file_values_apply_and_flags_override_them(first_run) -> None:
    saved = json.loads((first_run / "config.json").read_text())
    assert saved["bits"] == 5  # the command line beat the file's 6
    assert (saved["n_steps"], saved["eval_every"], saved["lr"]) == (4, 2, 1e-3)
    assert saved["plugins"] == ["dg_quant.qtdog"]  # loaded before its --bits was parsed
    assert saved["group_logging"] is False
    assert not any(":" in k for k in _last(first_run))  # group_logging false took effect


def test_saved_config_json_reruns_to_identical_results(first_run, tmp_path) -> None:
    again = tmp_path / "again"
    assert main(["--config", str(first_run / "config.json"), "--log_dir", str(again)]) == 0
    assert _last(again) == _last(first_run)
    a = torch.load(first_run / "model.pt", weights_only=False)["model"]
    b = torch.load(again / "model.pt", weights_only=False)["model"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_precedence_default_file_flag(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.01\nn_steps: 7\nseed: 3\nplugin: dg_quant.qtdog\nchannels-last: true\n")
    config, host = parse_config(["--config", str(path), "--lr", "0.02", "-p", "dg_quant.sagm"])
    assert config.lr == 0.02 and config.n_steps == 7 and config.seed == 3
    assert config.batch_size == 64  # neither file nor flag: the dataset preset
    assert config.channels_last is True
    assert host.names == ["dg_quant.qtdog", "dg_quant.sagm"]  # the file's plugin and the flag's


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_unknown_key_fails_in_one_line_with_a_suggestion(tmp_path, capsys) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("n_step: 5\n")
    err = _one_line_error(capsys, ["--config", str(path)])
    assert "unknown key 'n_step'" in err and "n_steps" in err and str(path) in err


def test_plugin_option_needs_its_plugin(tmp_path, capsys) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("bits: 4\n")
    assert "unknown key 'bits'" in _one_line_error(capsys, ["--config", str(path)])
    config, _ = parse_config(["--config", str(path), "-p", "dg_quant.qtdog"])
    assert config.bits == 4


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr: [1, 2\n", "not valid YAML"),
        ("- lr\n- 3\n", "expected a mapping"),
        ("resume: maybe\n", "resume is true or false"),
    ],
)
def test_malformed_files_fail_in_one_line(tmp_path, capsys, text, message) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert message in _one_line_error(capsys, ["--config", str(path)])


def test_missing_file(tmp_path, capsys) -> None:
    assert "no such file" in _one_line_error(capsys, ["--config", str(tmp_path / "nope.yaml")])
