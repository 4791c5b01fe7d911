"""The committed experiment tables are what their curated CSVs give (experiments/, --table-only)."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

from sparsekern_cl import table

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/cl/ -> repo
RESULTS = os.path.join(ROOT, "experiments", "results")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _same(tmp, name):
    with open(os.path.join(tmp, name)) as a, open(os.path.join(RESULTS, name)) as b:
        assert a.read() == b.read(), name


def test_baseline_tables(tmp_path, capsys):
    csv = os.path.join(RESULTS, "cl_mnist", "runs.csv")
    for args, name in ((["--split", "test"], "table"), (["--split", "test", "--setting", "task_il"], "table_task_il"),
                       (["--split", "val", "--select"], "selection")):  # fmt: skip
        assert table.main([csv, *args, "--out", str(tmp_path / name)]) == 0
        with open(os.path.join(RESULTS, "cl_mnist", f"{name}.md")) as f:
            assert (tmp_path / f"{name}.md").read_text() == f.read(), name


def test_dst_table(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    shutil.copy(os.path.join(RESULTS, "cl_dst_grid.csv"), tmp_path)
    out = str(tmp_path / "cl_dst_grid")
    assert _script("cl_dst").main(["--select-seeds", "1", "--table-only", "--out", out,
                                   "--runs", str(tmp_path / "none.jsonl")]) == 0  # fmt: skip
    _same(tmp_path, "cl_dst_grid.md")


def test_esacl_tables(tmp_path, capsys):
    grids = ("val", "main", "sasp", "ids", "rho", "abl08")
    for g in grids:
        shutil.copy(os.path.join(RESULTS, f"cl_esacl_{g}.csv"), tmp_path)
    mod = _script("cl_esacl")
    for g in ("all", "val", "abl08"):
        assert mod.main(["--grid", g, "--table-only", "--out", str(tmp_path)]) == 0
    for g in grids:
        _same(tmp_path, f"cl_esacl_{g}.md")


def test_sparcl_tables(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the script changes directory; the fixture changes it back
    mod = _script("cl_sparcl")
    for preset, args in (("paper", []), ("official", ["--preset", "official", "--seeds", "0", "1", "2", "--buffers",
                                                      "500", "--sparsities", "0.75", "--ablation-buffers"])):  # fmt: skip
        shutil.copy(os.path.join(RESULTS, f"cl_sparcl_{preset}.csv"), tmp_path)
        mod.main([*args, "--table-only", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")])
        _same(tmp_path, f"cl_sparcl_{preset}.md")


def test_r18_tables(tmp_path):
    _script("cl_r18").main(["--table-only", "--out", str(tmp_path)])
    for name in ("r18_main.md", "r18_diag.md"):
        _same(tmp_path, name)


def test_every_experiment_table_states_the_significance_rule():
    # one rule (sparsekern_cl.table: paired by seed, Holm-corrected) in every table that compares results
    for name in ("cl_sparcl_paper.md", "cl_sparcl_official.md", "cl_dst_grid.md", "cl_esacl_main.md", "r18_main.md"):
        with open(os.path.join(RESULTS, name)) as f:
            text = f.read()
        assert "Holm" in text, name
        if name == "cl_sparcl_paper.md":  # the ablation tables too, not only the main ones
            ablation = text.split("Ablation (paper's form)")[1:]
            assert ablation and all("p (Holm)" in part.split("\n\n")[1] for part in ablation)
