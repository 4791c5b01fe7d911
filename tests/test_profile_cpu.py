"""``benchmarks/tools/profile_cpu.py`` runs end to end on a tiny shape (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import os

import pytest

from sparsekern.kernels import cpu as cppmod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OK, WHY = cppmod.load_library()


def _load():
    spec = importlib.util.spec_from_file_location(
        "profile_cpu", os.path.join(ROOT, "benchmarks", "tools", "profile_cpu.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not OK and os.environ.get("CI", "").lower() != "true", reason="C++ kernels not built")
def test_profile_case_reports_every_part():
    mod = _load()
    r = mod.profile_case(8, 40, 24, 0.9, threads=1, mrt=0.01)
    for key in ("fwd", "dx", "dw"):
        assert r[f"{key}_dense_ms"] > 0 and r[f"{key}_cpp_ms"] > 0
    assert r["nnz"] > 0 and r["floor_ms"] > 0 and r["cpp_step_1t_ms"] > 0 and r["dense_bf16_step_ms"] > 0
    assert r["case"] == "linear 40->24 N8 unstr 90%"
