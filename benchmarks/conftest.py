"""pytest-benchmark entry to the benchmark suite: ``pytest benchmarks --benchmark-only``.

The cases are those of ``python -m sparsekern.bench`` (preset from ``SPARSEKERN_BENCH_PRESET``,
default ``quick``); the CPU thread count is pinned from ``SPARSEKERN_BENCH_THREADS`` (default:
the CPUs this process may use).  These are not part of the CI test suite (``testpaths`` is
``tests``); ``tests/test_bench_smoke.py`` keeps the runner itself from breaking.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAVE_PLUGIN = importlib.util.find_spec("pytest_benchmark") is not None


def bench_threads() -> int:
    env = os.environ.get("SPARSEKERN_BENCH_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise pytest.UsageError(f"SPARSEKERN_BENCH_THREADS: expected a positive integer, got {env!r}")
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pytest_configure(config):
    torch.set_num_threads(bench_threads())


def pytest_collection_modifyitems(config, items):
    if HAVE_PLUGIN:
        return
    skip = pytest.mark.skip(reason="pytest-benchmark is not installed (pip install -e .[bench])")
    for item in items:
        item.add_marker(skip)
