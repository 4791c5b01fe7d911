"""Run a list of cases and produce one result row per case."""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

import sparsekern

from .cases import DENSE_PROVIDERS, Case, ConvShape, ModelShape, block_of
from .goals import goal_fields
from .providers import Skip, availability, prepare
from .timing import TimingConfig, time_fns

__all__ = ["RunMeta", "collect_meta", "cpu_model", "git_commit", "run_cases", "COLUMNS"]

# the CSV's columns, in order (the case first, then the measurement, then the conditions); every
# results file of the suite has them.  ``count``: layers of this shape in the family's network;
# ``density``: the mask's real density (a block grid rounds the asked one); ``conv_algo``: what the
# cpp conv2d ops ran for fwd / dx / dw; ``max_rel_err``: against the reference, when checked
COLUMNS = [
    "case_id", "op", "provider", "mode", "shape", "dims", "family", "kernel", "model", "count", "batch",
    "sparsity", "density", "layout", "block", "dtype", "device",
    "status", "reason",
    "p50", "p20", "p80", "unit", "samples", "calls_per_sample", "gflops", "conv_algo", "max_rel_err",
    "dense_p50", "speedup_vs_dense", "dense_ref", "dense_bf16_p50", "speedup_vs_dense_bf16", "fastest_dense",
    "speedup_vs_fastest_dense", "goal", "goal_met",
    "machine", "cpu_model", "threads", "torch", "triton", "sparsekern", "commit", "time", "load_avg_1m", "command",
]  # fmt: skip


@dataclass
class RunMeta:
    """The conditions of a run, repeated on every row."""

    machine: str
    cpu_model: str
    threads: int
    torch: str
    triton: str
    sparsekern: str
    commit: str
    started: str
    command: str
    load_start: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_end: tuple[float, float, float] | None = None
    extra: dict = field(default_factory=dict)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """The checkout's short commit, ``-dirty`` when tracked files are modified; ``unknown`` outside git."""
    root = Path(sparsekern.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def _loadavg() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover - not on every platform
        return (float("nan"),) * 3


def collect_meta(threads: int, command: str) -> RunMeta:
    """The conditions of a run starting now, at ``threads`` CPU threads, made by ``command``."""
    return RunMeta(
        machine=f"{platform.system()} {platform.machine()}, {os.cpu_count()} logical CPUs",
        cpu_model=cpu_model(),
        threads=threads,
        torch=torch.__version__,
        triton=_version("triton"),
        sparsekern=sparsekern.__version__,
        commit=git_commit(),
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=command,
        load_start=_loadavg(),
    )


def _case_fields(case: Case) -> dict:
    shape = case.shape
    return {
        "case_id": case.id,
        "op": case.op,
        "provider": case.provider,
        "mode": case.mode,
        "shape": case.shape_name,
        "dims": case.dims,
        "family": shape.family,
        "kernel": shape.kernel if isinstance(shape, ConvShape) else "",
        "model": shape.model if isinstance(shape, ModelShape) else "",
        "count": (shape.count or "") if isinstance(shape, ConvShape) else "",
        "batch": case.batch,
        "sparsity": case.sparsity,
        "layout": case.layout,
        "block": block_of(case.layout) or "",
        "dtype": case.dtype,
        "device": case.device,
    }


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:9.3f} ms" if s < 10 else f"{s:9.2f} s "


def _precision(dtype: str, gpu: bool) -> None:
    """TF32 on for ``tfloat32`` cases, off for the rest (the fp32 goals are stated with TF32 off)."""
    if gpu:
        torch.set_float32_matmul_precision("high" if dtype == "tfloat32" else "highest")
        torch.backends.cudnn.allow_tf32 = dtype == "tfloat32"


def run_cases(
    cases: list[Case],
    cfg: TimingConfig,
    meta: RunMeta,
    *,
    log: Callable[[str], None] = print,
    seed: int = 0,
    check: bool = False,
) -> list[dict]:
    """Time every case; return the rows (dicts keyed by :data:`COLUMNS`).

    A case whose provider cannot run it becomes a ``skipped`` row with the reason; a case that
    fails while being timed becomes an ``error`` row.  Ratios use the dense case of the same
    group measured earlier in this run.  ``check``: see :func:`~sparsekern.bench.providers.prepare`.
    On CUDA, cuDNN picks its fastest algorithm per shape (``cudnn.benchmark``) and TF32 is off
    except for ``tfloat32`` cases; the previous settings are restored at the end.
    """
    torch.set_num_threads(cfg.threads)
    gpu = any(c.device == "cuda" for c in cases) and torch.cuda.is_available()
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    if gpu:
        torch.backends.cudnn.benchmark = True
    try:
        return _run(cases, cfg, meta, log, seed, check, gpu)
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1], saved[2]


def _baseline_fields(key: tuple, base: dict[str, float], p50: float) -> dict:
    """The ratio columns of a row timed at ``p50`` against the dense baselines timed in its group
    (``base``: provider -> p50): dense fp32, dense under bf16 autocast, and the fastest of them."""
    out = {}
    if "dense" in base:
        out.update(dense_p50=base["dense"] * 1e3, speedup_vs_dense=round(base["dense"] / p50, 4),
                   dense_ref=f"dense {key[0]} {key[1]}")  # fmt: skip
    if "dense-bf16" in base:
        out.update(dense_bf16_p50=base["dense-bf16"] * 1e3, speedup_vs_dense_bf16=round(base["dense-bf16"] / p50, 4))
    if base:
        fastest = min(base, key=base.get)
        out.update(fastest_dense=fastest, speedup_vs_fastest_dense=round(base[fastest] / p50, 4))
    return out


def _run(cases, cfg, meta, log, seed, check, gpu) -> list[dict]:
    """Cases sharing a dense reference (:meth:`Case.dense_key`) are prepared together and timed in
    alternating rounds (:func:`~sparsekern.bench.timing.time_fns`); rows keep the cases' order."""
    rows: list[dict | None] = [None] * len(cases)
    told: set[tuple[str, str]] = set()
    groups: dict[tuple, list[int]] = {}
    for i, case in enumerate(cases):
        groups.setdefault(case.dense_key(), []).append(i)
    for key, members in groups.items():
        prepared = []  # (index, case, row, Prepared)
        for i in members:
            case = cases[i]
            row = dict.fromkeys(COLUMNS, "")
            row.update(_case_fields(case))
            row.update(
                machine=meta.machine, cpu_model=meta.cpu_model, threads=meta.threads, torch=meta.torch,
                triton=meta.triton, sparsekern=meta.sparsekern, commit=meta.commit, command=meta.command,
            )  # fmt: skip
            row["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            row["load_avg_1m"] = round(_loadavg()[0], 2)
            rows[i] = row
            _precision(case.dtype, gpu)
            try:
                prepared.append((i, case, row, prepare(case, seed=seed, check=check)))
            except Skip as exc:
                row.update(status="skipped", reason=str(exc))
                row.update(goal_fields(row))
                told_key = (case.provider, str(exc))
                ok, _ = availability(case.provider, case.device)
                if ok or told_key not in told:  # an unavailable provider is announced once
                    told.add(told_key)
                    log(f"[{i + 1}/{len(cases)}] {case.id}: skipped ({exc})")
            except Exception as exc:  # a failing case must not end the sweep; the row says why
                _error(row, exc, log, i, len(cases), case)
        if not prepared:
            continue
        _precision(cases[members[0]].dtype, gpu)
        try:
            times = time_fns([p.fn for *_, p in prepared], cases[members[0]].device, cfg)
        except Exception as exc:
            for i, case, row, _ in prepared:
                _error(row, exc, log, i, len(cases), case)
            continue
        finally:
            gc.collect()
        base = {case.provider: t.p50 for (_, case, _, _), t in zip(prepared, times) if case.provider in DENSE_PROVIDERS}
        for (i, case, row, prep), t in zip(prepared, times):
            _report(row, case, prep, t, base, key, log, i, len(cases))
        sys.stdout.flush()
    meta.load_end = _loadavg()
    return [r for r in rows if r is not None]


def _error(row: dict, exc: Exception, log, i: int, n: int, case: Case) -> None:
    row.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
    row.update(goal_fields(row))
    log(f"[{i + 1}/{n}] {case.id}: ERROR {row['reason']}")


def _report(row: dict, case: Case, prep, t, base: dict[str, float], key, log, i: int, n: int) -> None:
    row.update(
        status="ok",
        density=round(prep.density, 6),
        p50=t.p50 * 1e3,
        p20=t.p20 * 1e3,
        p80=t.p80 * 1e3,
        unit="ms",
        samples=t.samples,
        calls_per_sample=t.calls_per_sample,
        gflops=round(prep.flops / t.p50 / 1e9, 3) if prep.flops else "",
        conv_algo=prep.conv_algo,
        max_rel_err=f"{prep.max_rel_err:.3g}" if prep.max_rel_err is not None else "",
    )
    row.update(_baseline_fields(key, base, t.p50))
    row.update(goal_fields(row))
    sp = ""
    if row["speedup_vs_dense"] != "":
        sp = f"  x{row['speedup_vs_dense']:.2f} vs dense"
        if row["fastest_dense"] not in ("", "dense"):
            sp += f", x{row['speedup_vs_fastest_dense']:.2f} vs {row['fastest_dense']}"
        if case.op == "rebuild":  # a rebuild is not a replacement for a dense pass: state its cost
            sp = f"  = {1 / row['speedup_vs_dense']:.2f} dense fwd+bwd of the layer"
    gl = f"  ({row['goal_met']})" if row["goal_met"] else ""
    if row["goal"]:
        gl = f"  goal {row['goal'].split(' (')[0]}: {row['goal_met']}"
    extra = (f"  algo {prep.conv_algo}" if prep.conv_algo else "") + (
        f"  rel err {row['max_rel_err']}" if row["max_rel_err"] else ""
    )
    log(f"[{i + 1}/{n}] {case.id}: {_fmt_s(t.p50)} (p20 {t.p20 * 1e3:.3f}, p80 {t.p80 * 1e3:.3f} ms){sp}{gl}{extra}")
