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

__all__ = ["Timing", "TimingConfig", "time_cpu", "time_cpu_rounds", "time_gpu", "time_fn", "time_fns"]


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


def time_cpu_rounds(fns: list[Callable[[], object]], cfg: TimingConfig, rounds: int = 5) -> list[Timing]:
    """:func:`time_cpu` of several callables in alternating rounds: each round times every callable
    for ``cfg.min_time / rounds`` (the order rotating from round to round), so a machine whose
    speed drifts (other jobs, a shared host) slows all of them alike and their ratios hold.  The
    percentiles are over the blocks of all rounds.
    """
    from torch.utils.benchmark import Timer

    torch.set_num_threads(cfg.threads)
    numbers, per_calls = [], []
    for fn in fns:
        t0 = time.perf_counter()
        calls = 0
        for _ in range(max(1, cfg.warmup)):
            fn()
            calls += 1
            if time.perf_counter() - t0 > 1.0:
                break
        per_call = (time.perf_counter() - t0) / calls
        per_calls.append(per_call)
        numbers.append(max(1, int(cfg.block_time / max(per_call, 1e-9))))
    timers = [Timer(stmt="fn()", globals={"fn": fn}, num_threads=cfg.threads) for fn in fns]
    samples: list[list[float]] = [[] for _ in fns]
    budget = cfg.min_time / rounds
    per_round = max(1, -(-cfg.min_samples // rounds))
    for r in range(rounds):
        order = list(range(len(fns)))
        order = order[r % len(order) :] + order[: r % len(order)] if order else order
        for i in order:
            spent, taken = 0.0, 0
            while taken < per_round or (spent < budget and taken < -(-cfg.max_samples // rounds)):
                m = timers[i].timeit(numbers[i])
                samples[i].append(m.mean)
                spent += m.mean * numbers[i]
                taken += 1
                if per_calls[i] > budget:  # a slow call: the minimum number of blocks per round
                    break
    return [
        Timing(statistics.median(x), _quantile(x, 0.2), _quantile(x, 0.8), len(x), n) for x, n in zip(samples, numbers)
    ]


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


def time_fns(fns: list[Callable[[], object]], device: str, cfg: TimingConfig) -> list[Timing]:
    """Callables compared with each other (a dense case and its sparse cases): on CPU in
    alternating rounds (:func:`time_cpu_rounds`); on CUDA one after the other (device time)."""
    if device == "cuda":
        return [time_gpu(fn, cfg) for fn in fns]
    if len(fns) == 1:
        return [time_cpu(fns[0], cfg)]
    return time_cpu_rounds(fns, cfg)
