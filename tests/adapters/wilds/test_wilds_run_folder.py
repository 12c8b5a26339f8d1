"""A run folder is owned by one live run, its files are trustworthy, and faults are one line.

Tiny runs on the embedded digits (4 steps) and the miniature Camelyon17/Amazon folders; the
signal and disk-full cases run ``wilds_run`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from dg_quant.adapters.wilds.cli import main, parse_config
from dg_quant.adapters.wilds.export import main as export_main
from dg_quant.adapters.wilds.run_folder import RunFolder
from dg_quant.adapters.wilds.runner import run
from dg_quant.hookimpl import hookimpl
from dg_quant.io import atomic_write_json, atomic_write_text, load_torch_file

TINY = ["--n_steps", "4", "--eval_every", "2", "--no_progress", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("digits") / "run"
    assert main([*TINY, "--log_dir", str(log_dir)]) == 0
    return log_dir


# -- one live run per folder (item 2) ---------------------------------------------------------


def test_a_folder_in_use_by_a_live_run_is_refused(tmp_path, capsys):
    log_dir = tmp_path / "run"
    with RunFolder(log_dir):  # another run holds it
        assert main([*TINY, "--log_dir", str(log_dir)]) == 2
    assert "in use by another running wilds_run" in _one_line(capsys)
    assert not (log_dir / "config.json").exists()


def test_the_lock_of_a_killed_run_is_released(tmp_path):
    log_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from dg_quant.adapters.wilds.run_folder import RunFolder; "
            f"RunFolder({str(log_dir)!r}).claim(); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(Exception, match="in use"):
        RunFolder(log_dir).claim()
    holder.kill()
    holder.wait()
    folder = RunFolder(log_dir)
    folder.claim()  # kill -9 leaves no stuck lock
    folder.release()


def test_default_folder_names_tell_runs_apart():
    base = ["-d", "pacs", "--root_dir", "nowhere"]
    names = {
        parse_config(argv)[0].log_dir
        for argv in (
            [*base, "--test_domain", "sketch"],
            [*base, "--test_domain", "photo"],
            [*base, "--test_domain", "sketch", "--model", "resnet18"],
            [*base, "--test_domain", "sketch", "-p", "dg_quant.qtdog", "--bits", "7"],
            [*base, "--test_domain", "sketch", "-p", "dg_quant.qtdog", "--bits", "5"],
            [*base, "--test_domain", "sketch", "--seed", "1"],
        )
    }
    assert len(names) == 6
    assert parse_config([*base, "--test_domain", "sketch", "-p", "dg_quant.qtdog", "--bits", "5"])[0].log_dir == str(
        Path("runs/pacs_sketch_resnet50_qtdog_w5_seed0")
    )


# -- file hygiene (item 11) ---------------------------------------------------------------------


def test_files_follow_the_umask(digits_run, tmp_path):
    for name in ("config.json", "results.jsonl", "last.pt", "best_model.pt", "model.pt", "final.json"):
        assert (digits_run / name).stat().st_mode & 0o777 == 0o644, name  # the test session's umask 022
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "shared.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "shared.txt").stat().st_mode & 0o777 == 0o640


def test_a_failed_start_leaves_no_folder(tmp_path, capsys):
    log_dir = tmp_path / "new" / "run"
    assert main([*TINY, "--log_dir", str(log_dir), "--batch_size", "100000"]) == 2
    assert "fewer than --batch_size" in _one_line(capsys)
    assert not log_dir.exists()


def test_stale_temporaries_are_removed_on_resume(tmp_path):
    log_dir = tmp_path / "run"
    argv = [*TINY, "--log_dir", str(log_dir)]
    assert main(argv) == 0
    stale = log_dir / ".last.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert main([*argv, "--resume"]) == 0
    assert not stale.exists()


def test_sigterm_saves_a_checkpoint_and_prints_the_resume_command(tmp_path):
    log_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "dg_quant.adapters.wilds.cli",
        "--n_steps",
        "100000",
        "--eval_every",
        "100000",
        "--save_every",
        "5",
        "--no_progress",
        "--device",
        "cpu",
        "--log_dir",
        str(log_dir),
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 300
    while not (log_dir / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM at step" in err and "--resume" in err.splitlines()[-1]
    step = int(err.split("at step ")[1].split(";")[0])
    assert torch.load(log_dir / "last.pt", weights_only=False)["trainer"]["step"] == step  # saved at the stop


# -- integrity and NaN (item 5) ------------------------------------------------------------------


def _flip_a_byte(path: Path) -> None:
    """Flip one byte in the middle of the largest record (tensor data) of a torch.save archive."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    header = info.header_offset
    name_len = int.from_bytes(raw[header + 26 : header + 28], "little")
    extra_len = int.from_bytes(raw[header + 28 : header + 30], "little")
    raw[header + 30 + name_len + extra_len + info.file_size // 2] ^= 0x04
    path.write_bytes(bytes(raw))


def test_a_flipped_byte_in_last_pt_stops_resume(tmp_path, capsys):
    log_dir = tmp_path / "run"
    argv = [*TINY, "--log_dir", str(log_dir), "--n_steps", "2"]
    assert main(argv) == 0
    _flip_a_byte(log_dir / "last.pt")
    assert torch.load(log_dir / "last.pt", weights_only=False)  # torch alone loads it silently
    capsys.readouterr()
    assert main([*argv, "--n_steps", "2", "--resume"]) == 2
    assert "last.pt is damaged (a record fails its checksum)" in _one_line(capsys)


def test_a_flipped_byte_in_best_model_pt_is_not_exported(digits_run, tmp_path, capsys):
    copy = tmp_path / "run"
    copy.mkdir()
    for f in digits_run.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    _flip_a_byte(copy / "best_model.pt")
    capsys.readouterr()
    assert export_main([str(copy), "-o", str(tmp_path / "m.dgq")]) == 2
    assert "best_model.pt is damaged" in _one_line(capsys)
    assert not (tmp_path / "m.dgq").exists()
    load_torch_file(digits_run / "best_model.pt")  # the intact file passes


class PoisonWeights:
    """Makes the weights NaN at one step, as an exploding update would."""

    def __init__(self, at: int) -> None:
        self.at = at

    @hookimpl
    def dgq_after_step(self, model, step: int) -> None:
        if step == self.at:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))


def test_a_nan_run_stops_and_keeps_its_last_good_checkpoint(tmp_path):
    log_dir = tmp_path / "run"
    config, host = parse_config([*TINY, "--log_dir", str(log_dir), "--n_steps", "6"])
    host.register(PoisonWeights(at=2))
    good = None
    with pytest.raises(Exception, match=r"became non-finite .*last good checkpoint .*last.pt \(step 2\) is kept"):
        run(config, host)
    good = load_torch_file(log_dir / "last.pt")
    assert good["trainer"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in good["trainer"]["model"].values() if v.is_floating_point())
    assert not (log_dir / "final.json").exists()


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_flags_are_refused(tmp_path, capsys, value):
    with pytest.raises(SystemExit):
        main([*TINY, "--log_dir", str(tmp_path / "run"), "--lr", value])
    assert f"--lr must be a finite number; got {value}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_json_files_never_hold_bare_nan(tmp_path):
    atomic_write_json(
        tmp_path / "a.json", {"x": float("nan"), "y": [float("inf"), 1.5], "z": torch.tensor(float("nan"))}
    )
    text = (tmp_path / "a.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"x": None, "y": [None, 1.5], "z": None}


# -- one line instead of a traceback (item 9) ------------------------------------------------------


def test_disk_full_during_a_checkpoint_is_one_line(tmp_path, capsys):
    """A file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes writes past 1 MB fail with EFBIG, as a
    full disk fails them with ENOSPC; torch.save reports it from ``inline_container.cc``."""
    log_dir = tmp_path / "run"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        status = main([*TINY, "--log_dir", str(log_dir)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert status == 2
    err = _one_line(capsys)
    assert "cannot write" in err and "last.pt" in err
    assert not list(log_dir.glob(".*.tmp"))


def test_output_flag_naming_a_folder_is_one_line(digits_run, tmp_path, capsys):
    assert export_main([str(digits_run), "-o", str(tmp_path)]) == 2
    assert "it is a folder; give a file name" in _one_line(capsys)


def test_an_unwritable_log_dir_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main([*TINY, "--log_dir", str(blocker / "run")]) == 2
    assert "cannot create --log_dir" in _one_line(capsys)
    assert main([*TINY, "--log_dir", "/proc/dgq_run"]) == 2
    assert "cannot create --log_dir /proc/dgq_run" in _one_line(capsys)


def test_truncated_reviews_csv_is_one_line(tmp_path, capsys):
    from tests.adapters.wilds.conftest import TEXT_MODEL, write_amazon

    data_dir = write_amazon(tmp_path / "data")
    raw = (data_dir / "reviews.csv").read_bytes()
    (data_dir / "reviews.csv").write_bytes(raw[: len(raw) // 2])
    assert (
        main(
            [
                "-d",
                "amazon",
                "--root_dir",
                str(tmp_path / "data"),
                "--model",
                TEXT_MODEL,
                "--max_token_length",
                "16",
                *TINY,
                "--log_dir",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    assert "amazon under" in _one_line(capsys)
    assert not (tmp_path / "run").exists()


CAMELYON = ["-d", "camelyon17", "--model", "test_cnn", "--image_size", "16", "--batch_size", "8", *TINY]


def test_too_many_groups_per_batch_is_one_line(camelyon_root, tmp_path, capsys):
    assert (
        main(
            [
                *CAMELYON,
                "--root_dir",
                str(camelyon_root),
                "--log_dir",
                str(tmp_path / "run"),
                "--train_loader",
                "group",
                "--n_groups_per_batch",
                "4",
            ]
        )
        == 2
    )
    assert "--n_groups_per_batch 4: the train split has only 3 groups" in _one_line(capsys)


def test_a_missing_patch_is_named_before_training(make_camelyon17, tmp_path, capsys):
    data_dir = make_camelyon17(tmp_path / "data")
    patch = next((data_dir / "patches").rglob("*.png"))
    patch.unlink()
    assert main([*CAMELYON, "--root_dir", str(tmp_path / "data"), "--log_dir", str(tmp_path / "run")]) == 2
    err = _one_line(capsys)
    assert "1 of the 80 input files of camelyon17 are missing" in err and patch.name in err
    assert not (tmp_path / "run").exists()


# -- settings that would be ignored (item 10) --------------------------------------------------------


def test_test_domain_on_an_official_wilds_split_is_refused(camelyon_root, tmp_path, capsys):
    assert (
        main([*CAMELYON, "--root_dir", str(camelyon_root), "--log_dir", str(tmp_path / "run"), "--test_domain", "2"])
        == 2
    )
    assert "--test_domain 2: camelyon17 has WILDS' fixed split" in _one_line(capsys)


@pytest.mark.parametrize("plugin", ["dg_quant.qtdog", "dg_quant.fqat"])
def test_a_quantization_start_past_the_end_is_refused(tmp_path, capsys, plugin):
    assert main([*TINY, "--log_dir", str(tmp_path / "run"), "-p", plugin, "--quant_start_step", "4"]) == 2
    assert "--quant_start_step 4 is not before the end of the run (4 steps)" in _one_line(capsys)
    assert not (tmp_path / "run").exists()


class _BadInput(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, idx: int):
        from dg_quant.errors import DataError

        raise DataError(f"cannot read input /data/{idx}.png of demo (OSError: truncated)")


def test_an_input_error_from_a_loader_worker_stays_one_line():
    from dg_quant.adapters.wilds.input_checks import worker_message
    from dg_quant.errors import DataError

    with pytest.raises(DataError) as caught:
        next(iter(torch.utils.data.DataLoader(_BadInput(), num_workers=1)))
    assert "Traceback" in str(caught.value)  # torch re-raises with the worker's traceback as text
    assert worker_message(caught.value) == "cannot read input /data/0.png of demo (OSError: truncated)"
