"""``dgq_analyze`` subcommands on real run folders: PNG plus CSV for every figure."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dg_quant.adapters.wilds import analyze


def test_table_writes_every_format(tiny_runs, tmp_path, capsys):
    assert analyze.main(["table", str(tiny_runs["root"]), "--format", "all", "--out", str(tmp_path)]) == 0
    for name in ("results.txt", "results.md", "results.csv", "results.tex", "runs.csv"):
        assert (tmp_path / name).stat().st_size > 0
    summary = pd.read_csv(tmp_path / "results.csv")
    assert set(summary["method"]) == {"erm", "qtdog", "EoQ erm"}
    assert "rot75" in capsys.readouterr().out


def test_figures(tiny_runs, tmp_path):
    runs = [str(tiny_runs["erm0"]), str(tiny_runs["qtdog"])]
    fast = ["--max_batches", "1", "--out", str(tmp_path)]
    assert analyze.main(["flatness", *runs, "--radii", "0", "2", "--directions", "2", *fast]) == 0
    assert analyze.main(["surface", runs[1], "--points", "3", *fast]) == 0
    assert analyze.main(["surface", runs[1], "--dims", "2", "--points", "3", *fast]) == 0
    assert analyze.main(["noise", runs[1], "--out", str(tmp_path)]) == 0
    assert analyze.main(["stability", *runs, "--out", str(tmp_path)]) == 0
    for stem in ("flatness", "surface1d", "surface2d_qtdog_seed0", "noise", "noise_kl", "stability"):
        assert (tmp_path / f"{stem}.png").read_bytes()[:4] == b"\x89PNG", stem
        assert len(pd.read_csv(tmp_path / f"{stem}.csv")) > 0, stem
    flat = pd.read_csv(tmp_path / "flatness.csv")
    assert len(flat) == 2 * 2 * 2  # runs x splits x radii
    assert (flat.loc[flat.radius == 0, "f_gamma"] == 0).all()
    assert len(pd.read_csv(tmp_path / "surface2d_qtdog_seed0.csv")) == 9


def test_bad_input_is_one_line(tiny_runs, tmp_path, capsys):
    assert analyze.main(["flatness", str(tiny_runs["erm0"]), "--splits", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown split" in capsys.readouterr().err
    assert analyze.main(["table", str(tmp_path / "missing")]) == 2
    assert analyze.main(["noise", str(tiny_runs["qtdog"]), "--layer", "x", "--out", str(tmp_path)]) == 2
    assert "unknown layer" in capsys.readouterr().err


def _listed(out: str) -> set[str]:
    return {p for line in out.splitlines() if line.startswith("wrote ") for p in line[6:].split(", ")}


def test_figures_go_beside_the_runs_and_every_file_is_listed(tiny_runs, tmp_path, monkeypatch, capsys):
    import shutil

    runs = tmp_path / "runs"
    for name in ("erm0", "qtdog"):
        shutil.copytree(tiny_runs[name], runs / name)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    assert analyze.main(["noise", str(runs / "qtdog")]) == 0
    noise_files = {p for p in (runs / "qtdog" / "analysis").iterdir()}
    assert {p.name for p in noise_files} >= {
        "noise.png",
        "noise.csv",
        "noise_kl.png",
        "noise_kl.csv",
        "noise_layers.csv",
    }
    assert {str(p.resolve()) for p in noise_files} == {
        str(p.resolve()) for p in map(Path, _listed(capsys.readouterr().out))
    }
    assert analyze.main(["stability", str(runs / "erm0"), str(runs / "qtdog")]) == 0
    stability_files = set((runs / "analysis").iterdir())
    assert {p.name for p in stability_files} == {"stability.png", "stability.csv", "stability_summary.csv"}
    assert {str(p.resolve()) for p in stability_files} == {
        str(p.resolve()) for p in map(Path, _listed(capsys.readouterr().out))
    }
    assert list(cwd.iterdir()) == []  # nothing in the current folder
