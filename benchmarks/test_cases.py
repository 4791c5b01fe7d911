"""The benchmark registry's cases as pytest-benchmark tests (one test per case id)."""

from __future__ import annotations

import os

import pytest
import torch

from sparsekern.bench import PRESETS, Skip, expand, prepare

PRESET = os.environ.get("SPARSEKERN_BENCH_PRESET", "quick")
if PRESET not in PRESETS:
    raise pytest.UsageError(f"SPARSEKERN_BENCH_PRESET: expected one of {sorted(PRESETS)}, got {PRESET!r}")

CASES = expand(PRESETS[PRESET])


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_case(benchmark, case):
    try:
        prep = prepare(case)
    except Skip as exc:
        pytest.skip(str(exc))
    benchmark.group = f"{case.op}-{case.mode}-{case.shape_name}-N{case.batch}-{case.dtype}"
    benchmark.extra_info.update(
        op=case.op, provider=case.provider, layout=case.layout, sparsity=case.sparsity,
        density=prep.density, flops=prep.flops, threads=torch.get_num_threads(),
    )  # fmt: skip
    if case.device == "cuda":

        def fn():
            prep.fn()
            torch.cuda.synchronize()
    else:
        fn = prep.fn
    benchmark.pedantic(fn, warmup_rounds=1, rounds=5, iterations=1)
