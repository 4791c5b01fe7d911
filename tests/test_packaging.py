"""Packaging: the sdist carries what builds the kernels, a failed build gives a pure wheel, the
extension refuses a torch it was not built against, configs resolve from an install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest
import torch

from sparsekern.kernels import cpu
from sparsekern_cl.config import load_config_file, shipped_config
from tests.support import ROOT, requires_cpp

_BUILD_SOURCES = (".h", ".hpp", ".cpp", ".cu", ".cuh")


def _source_copy(tmp_path):
    """The source tree without build outputs, VCS data and the results folders (faster to pack)."""
    dst = tmp_path / "src"
    shutil.copytree(
        ROOT,
        dst,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.so", "*.egg-info", "__pycache__", "runs", "out", "results"
        ),
    )
    return dst


def _setup(src, *args, env=None, timeout=600):
    clean = {k: v for k, v in os.environ.items() if k not in ("SPARSEKERN_STRICT", "SPARSEKERN_REQUIRE_BUILD", "CI")}
    return subprocess.run(
        [sys.executable, "setup.py", *args],
        cwd=src,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_sdist_lists_every_kernel_source_header_and_config(tmp_path):
    src = _source_copy(tmp_path)
    run = _setup(src, "-q", "sdist", "-d", str(tmp_path / "dist"))
    assert run.returncode == 0, run.stderr[-3000:]
    (tarball,) = (tmp_path / "dist").glob("sparsekern-*.tar.gz")
    with tarfile.open(tarball) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    wanted = {
        str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in _BUILD_SOURCES and p.is_file()
    }
    assert any(n.endswith(".cu") for n in wanted) and any(n.endswith(".h") for n in wanted)
    assert wanted <= names, sorted(wanted - names)
    configs = {f"configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    assert configs and configs <= names, sorted(configs - names)
    assert {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE"} <= names
    assert not [n for n in names if n.endswith(".so")]


def test_a_failed_kernel_build_is_loud_and_gives_a_pure_wheel(tmp_path):
    """A compiler that fails: a banner, and the wheel is py3-none-any (never platform-tagged
    without the extension); the configs ship inside it."""
    src = _source_copy(tmp_path)
    run = _setup(src, "-q", "bdist_wheel", "-d", str(tmp_path / "dist"), env={"CXX": "false", "MAX_JOBS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "BUILDING THE C++ KERNELS FAILED" in run.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert not [n for n in names if n.endswith(".so")]
    assert "sparsekern_cl/configs/demo.yaml" in names
    with zipfile.ZipFile(wheel) as zf:
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = zf.read(meta).decode()
    assert "License-Expression: BSD-3-Clause" in text and "License-File: LICENSE" in text


def test_a_failed_kernel_build_is_fatal_under_strict(tmp_path):
    src = _source_copy(tmp_path)
    env = {"CXX": "false", "MAX_JOBS": "1", "SPARSEKERN_STRICT": "1"}
    run = _setup(src, "-q", "build_ext", "--inplace", env=env)
    assert run.returncode != 0


def test_pyproject_metadata_and_extras():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(c.startswith("Programming Language :: Python :: 3") for c in meta["classifiers"])
    assert any(c.startswith("Topic :: ") for c in meta["classifiers"])
    assert meta["license"] == "BSD-3-Clause" and meta["license-files"] == ["LICENSE"]
    assert "Copyright (c) 2026, the sparsekern authors" in (ROOT / "LICENSE").read_text()
    extras = meta["optional-dependencies"]
    assert any(d.startswith("matplotlib") for d in extras["cl"])  # sparsekern_cl.plots
    assert any(d.startswith("matplotlib") for d in extras["bench"])  # sparsekern.bench.report


def test_readme_config_paths_resolve_outside_the_source_tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config_file("configs/demo.yaml") == load_config_file(str(ROOT / "configs" / "demo.yaml"))
    assert os.path.isfile(shipped_config("demo.yaml"))
    with pytest.raises(FileNotFoundError, match="shipped config"):
        load_config_file("configs/no_such_config.yaml")


def test_torch_version_mismatch_is_refused_with_the_reason():
    cpu.check_torch_version("2.13.0+cpu", "2.13.0+cpu")
    with pytest.raises(ImportError, match=r"built against torch 2\.4\.0\+cpu but torch 2\.13\.0\+cpu is running"):
        cpu.check_torch_version("2.4.0+cpu", "2.13.0+cpu")


@requires_cpp
def test_the_extension_records_its_torch_and_load_library_refuses_another(monkeypatch):
    assert cpu.load_library()[0]
    assert torch.ops.sparsekern.built_with_torch() == torch.__version__
    saved = dict(cpu._STATE)
    try:
        cpu._STATE.clear()
        monkeypatch.setattr(torch, "__version__", "0.0.1+other")
        ok, why = cpu.load_library()
        assert not ok and "built against torch" in why and "0.0.1+other" in why
    finally:
        cpu._STATE.clear()
        cpu._STATE.update(saved)
