"""Timing: ``torch.utils.benchmark`` on CPU (pinned thread count), ``triton.testing.do_bench`` on GPU.

Both return a :class:`Timing` with the median and the 20th / 80th percentiles of the per-call
time in seconds.  The callable is warmed up first; everything it needs is built before it is
handed over, so only the call itself is timed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Timing", "TimingConfig", "time_cpu", "time_gpu", "time_fn"]


@dataclass(frozen=True)
class Timing:
    p50: float
    p20: float
    p80: float
    samples: int  # number of timed blocks
    calls_per_sample: int


@dataclass(frozen=True)
class TimingConfig:
    """How long to time each case.

    Attributes:
        threads: CPU threads, pinned for every case (``torch.set_num_threads`` and the Timer's own).
        warmup: untimed calls before timing.
        min_time: seconds of timed calls per case (at least ``min_samples`` blocks are taken).
        block_time: target length of one timed block; fast calls are repeated inside a block so
            the timer's resolution does not matter.
        min_samples / max_samples: bounds on the number of blocks.
    """

    threads: int = 1
    warmup: int = 2
    min_time: float = 0.3
    block_time: float = 0.02
    min_samples: int = 5
    max_samples: int = 50


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_cpu(fn: Callable[[], object], cfg: TimingConfig) -> Timing:
    """Median / p20 / p80 of ``fn()`` with ``torch.utils.benchmark.Timer`` at ``cfg.threads`` threads."""
    from torch.utils.benchmark import Timer

    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    calls = 0
    for _ in range(max(1, cfg.warmup)):
        fn()
        calls += 1
        if time.perf_counter() - t0 > 1.0:  # one warm-up call is enough for a slow case
            break
    per_call = (time.perf_counter() - t0) / calls
    number = max(1, int(cfg.block_time / max(per_call, 1e-9)))
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=cfg.threads)
    samples: list[float] = []
    spent = 0.0
    while len(samples) < cfg.max_samples and (len(samples) < cfg.min_samples or spent < cfg.min_time):
        m = timer.timeit(number)
        samples.append(m.mean)
        spent += m.mean * number
        # a slow call (longer than the whole budget) is timed min_samples times, not more; one
        # of over a second (e.g. torch.sparse's CSR backward on a large layer) three times
        if per_call > cfg.min_time and len(samples) >= cfg.min_samples:
            break
        if per_call > 1.0 and len(samples) >= min(3, cfg.min_samples):
            break
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), len(samples), number)


def time_gpu(fn: Callable[[], object], cfg: TimingConfig) -> Timing:
    """Median / p20 / p80 of ``fn()`` on the current CUDA device with ``triton.testing.do_bench``."""
    from triton.testing import do_bench

    for _ in range(max(1, cfg.warmup)):
        fn()
    torch.cuda.synchronize()
    rep_ms = max(25, int(cfg.min_time * 1000))
    p50, p20, p80 = do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return Timing(p50 / 1e3, p20 / 1e3, p80 / 1e3, 0, 1)


def time_fn(fn: Callable[[], object], device: str, cfg: TimingConfig) -> Timing:
    return time_gpu(fn, cfg) if device == "cuda" else time_cpu(fn, cfg)
