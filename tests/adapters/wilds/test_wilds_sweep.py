"""``dgq_sweep``: points from a sweep file, launched through submitit, skip-finished, resume-killed, status."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dg_quant.adapters.wilds import sweep as sw
from dg_quant.adapters.wilds.analyze import main as analyze_main
from dg_quant.adapters.wilds.cli import parse_config
from dg_quant.adapters.wilds.runner import run
from dg_quant.errors import ConfigError
from tests.adapters.wilds.test_wilds_resume import Kill

REPO = Path(__file__).resolve().parents[3]
# two methods x one seed on the embedded digits, 4 steps each, in submitit's debug executor
DIGITS = {
    "name": "digits",
    "fixed": {"n_steps": 4, "eval_every": 2, "device": "cpu", "group_logging": False, "lr": "1e-3"},
    "methods": {"erm": {}, "qtdog": {"plugin": ["dg_quant.qtdog"], "bits": 6, "quant_start_step": 2}},
    "seeds": [0],
    "launcher": {"executor": "debug"},
}


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def _final(run_dir: Path) -> dict:
    return json.loads((run_dir / "final.json").read_text())


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The digits sweep launched once; returns (sweep file, output folder, launch output)."""
    folder = tmp_path_factory.mktemp("sweep")
    path = _write(folder / "digits.yaml", {**DIGITS, "output": str(folder / "out")})
    assert sw.main(["launch", str(path)]) == 0
    return path, folder / "out"


def test_points_are_the_product_with_deterministic_folders(tmp_path) -> None:
    spec = {
        **DIGITS,
        "test_domains": ["rot75", "rot60"],
        "seeds": 2,
        "grid": {"bits": [4, 7], "lr": [0.1]},
        "methods": ["erm", "qtdog"],
    }
    sweep = sw.read_sweep(_write(tmp_path / "s.yaml", spec))
    names = [p.name for p in sweep.points]
    assert len(names) == len(set(names)) == 2 * 2 * 2 * 2
    assert "qtdog/rot60/bits7_lr0.1/seed1" in names
    point = next(p for p in sweep.points if p.name == "qtdog/rot60/bits7_lr0.1/seed1")
    assert point.settings == {**DIGITS["fixed"], "bits": 7, "lr": 0.1, "seed": 1, "test_domain": "rot60"}
    assert sweep.output == Path("runs/sweeps/digits").absolute()  # the default output folder


def test_random_search_is_seeded_per_name(tmp_path) -> None:
    ranges = {"trials": 3, "seed": 5, "lr": {"log_uniform": [1e-5, 1e-2]}}
    one = sw.read_sweep(_write(tmp_path / "a.yaml", {**DIGITS, "random": ranges}))
    more = {**ranges, "batch_size": {"choice": [16, 32]}, "momentum": {"uniform": [0.5, 0.9]}}
    two = sw.read_sweep(_write(tmp_path / "b.yaml", {**DIGITS, "random": more}))
    lrs = [p.settings["lr"] for p in one.points if p.name.startswith("erm/")]
    assert len(set(lrs)) == 3 and all(1e-5 <= v <= 1e-2 for v in lrs)
    # adding ranges does not change the values already drawn for lr
    assert lrs == [p.settings["lr"] for p in two.points if p.name.startswith("erm/")]
    assert {p.settings["batch_size"] for p in two.points} <= {16, 32}
    again = sw.read_sweep(_write(tmp_path / "c.yaml", {**DIGITS, "random": {**ranges, "seed": 6}}))
    assert lrs != [p.settings["lr"] for p in again.points if p.name.startswith("erm/")]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({**DIGITS, "method": {}}, "unknown sweep key 'method'; did you mean methods"),
        ({**DIGITS, "random": {"lr": {"gauss": [0, 1]}}}, "random.lr must be one of"),
        ({**DIGITS, "launcher": {"executor": "kubernetes"}}, "launcher.executor 'kubernetes'"),
        ({**DIGITS, "fixed": {"n_stepz": 3}}, "erm/default/seed0: "),
    ],
)
def test_bad_sweep_files_fail_in_one_line(tmp_path, capsys, spec, message) -> None:
    path = _write(tmp_path / "s.yaml", {**spec, "output": str(tmp_path / "out")})
    assert sw.main(["launch", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_launch_runs_every_point_into_a_table(launched, capsys) -> None:
    path, out = launched
    for method in ("erm", "qtdog"):
        final = _final(out / method / "default" / "seed0")
        assert final["steps"] == 4
        assert final["plugins"] == ([] if method == "erm" else ["dg_quant.qtdog"])
    assert sw.main(["status", str(path)]) == 0
    assert "2 runs in" in (text := capsys.readouterr().out) and "2 done, 0 running, 0 failed" in text
    assert analyze_main(["table", str(out), "--selection", "last"]) == 0
    table = capsys.readouterr().out
    assert "erm" in table and "qtdog" in table


def test_relaunch_skips_finished_runs(launched, capsys) -> None:
    path, out = launched
    final = out / "erm" / "default" / "seed0" / "final.json"
    before = final.stat().st_mtime_ns
    assert sw.main(["launch", str(out)]) == 0  # the output folder works as well as the file
    assert "launching 0 (0 resumed), 2 finished" in capsys.readouterr().err
    assert final.stat().st_mtime_ns == before


def test_relaunch_resumes_a_killed_run_and_status_shows_it(launched, tmp_path, capsys) -> None:
    _, done = launched
    path = _write(tmp_path / "digits.yaml", {**DIGITS, "output": str(tmp_path / "out")})
    sweep = sw.read_sweep(path)
    sw.prepare(sweep)
    killed = tmp_path / "out" / "qtdog" / "default" / "seed0"
    config, host = parse_config(sw.point_argv(killed))
    host.register(Kill(3))
    with pytest.raises(KeyboardInterrupt):
        run(config, host)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a job process that is gone, as after kill -9
    (killed / sw.STATE_FILE).write_text(json.dumps({"state": "running", "host": os.uname().nodename, "pid": dead.pid}))
    assert sw.main(["status", str(path)]) == 0
    status = capsys.readouterr().out
    assert "0 done" in status and "1 killed" in status and "1 pending" in status
    assert "killed   qtdog/default/seed0  step 2/4" in status

    assert sw.main(["launch", str(path)]) == 0
    assert "launching 2 (1 resumed)" in capsys.readouterr().err
    assert "--resume" in json.loads((killed / sw.STATE_FILE).read_text())["argv"]
    # the resumed run ends exactly like the uninterrupted one of the first sweep
    assert _final(killed)["last"] == _final(done / "qtdog" / "default" / "seed0")["last"]


def test_status_names_the_failing_runs_error(tmp_path, capsys) -> None:
    spec = {
        **DIGITS,
        "methods": {"erm": {"val_metric": "id_val/no_such_metric", "n_steps": 2}},
        "output": str(tmp_path / "out"),
    }
    path = _write(tmp_path / "bad.yaml", spec)
    assert sw.main(["launch", str(path)]) == 0  # the sweep ran; the run failed
    capsys.readouterr()
    assert sw.main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 failed" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("failed"))
    assert "erm/default/seed0" in line and "wilds_run: error: --val_metric 'id_val/no_such_metric'" in line


def test_set_overrides_fixed_settings_and_is_saved(tmp_path) -> None:
    path = _write(tmp_path / "s.yaml", {**DIGITS, "output": str(tmp_path / "out")})
    assert sw.main(["launch", str(path), "--set", "n_steps=2", "eval_every=1", "--dry_run"]) == 0
    assert sw.main(["launch", str(path), "--set", "n_steps=2", "--executor", "debug"]) == 0
    assert _final(tmp_path / "out" / "erm" / "default" / "seed0")["steps"] == 2
    saved = yaml.safe_load((tmp_path / "out" / "sweep.yaml").read_text())
    assert saved["fixed"]["n_steps"] == 2


def _fake_slurm(bin_dir: Path) -> None:
    """``srun`` and ``sbatch`` stand-ins: submitit writes the real sbatch script and calls them."""
    bin_dir.mkdir()
    for name, body in (("srun", "exit 0"), ("sbatch", 'echo "Submitted batch job 4242"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)


def test_slurm_array_gets_the_partition_gpus_time_and_parallelism(tmp_path, monkeypatch, capsys) -> None:
    spec = {
        **DIGITS,
        "seeds": [0, 1, 2],
        "launcher": {"executor": "slurm", "partition": "gpu", "time": 30},
        "output": str(tmp_path / "out"),
    }
    path = _write(tmp_path / "s.yaml", spec)
    assert sw.main(["launch", str(path)]) == 2  # no srun on this machine
    assert "launch from a Slurm login node" in capsys.readouterr().err
    _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert sw.main(["launch", str(path), "--gpus", "1", "--parallel", "4", "--time", "90"]) == 0
    script = (tmp_path / "out" / ".submitit" / "4242" / "4242_submission.sh").read_text()
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --time=90",
        "#SBATCH --array=0-5%4",
        "#SBATCH --job-name=dgq_digits",
    ):
        assert line in script
    assert "submitted Slurm array 4242" in capsys.readouterr().err
    # queued jobs count as running: launching again submits nothing
    assert sw.main(["status", str(path)]) == 0
    assert "6 running" in capsys.readouterr().out
    assert sw.main(["launch", str(path)]) == 0
    assert "launching 0 (0 resumed), 6 finished or running" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "sweeps").glob("*.yaml")))
def test_shipped_sweep_files_parse(name) -> None:
    sweep = sw.read_sweep(REPO / "sweeps" / name)
    assert sweep.points and len({p.name for p in sweep.points}) == len(sweep.points)
    for point in sweep.points:
        try:
            sw.check_settings(point.settings)
        except ConfigError as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"{name} {point.name}: {exc}")
