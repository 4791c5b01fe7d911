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

from .cases import Case, ConvShape, ModelShape, block_of
from .goals import goal_for
from .providers import Skip, availability, prepare
from .timing import TimingConfig, time_fn

__all__ = ["RunMeta", "collect_meta", "run_cases", "COLUMNS"]

# the CSV's columns, in order (the case first, then the measurement, then the conditions)
COLUMNS = [
    "case_id", "op", "provider", "mode", "shape", "dims", "family", "kernel", "model", "batch",
    "sparsity", "density", "layout", "block", "dtype", "device",
    "status", "reason",
    "p50", "p20", "p80", "unit", "samples", "calls_per_sample", "gflops",
    "dense_p50", "speedup_vs_dense", "dense_ref", "goal", "goal_met",
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


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    root = Path(sparsekern.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10
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
    return RunMeta(
        machine=f"{platform.system()} {platform.machine()}, {os.cpu_count()} logical CPUs",
        cpu_model=_cpu_model(),
        threads=threads,
        torch=torch.__version__,
        triton=_version("triton"),
        sparsekern=sparsekern.__version__,
        commit=_commit(),
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
        "batch": case.batch,
        "sparsity": case.sparsity,
        "layout": case.layout,
        "block": block_of(case.layout) or "",
        "dtype": case.dtype,
        "device": case.device,
    }


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:9.3f} ms" if s < 10 else f"{s:9.2f} s "


def run_cases(
    cases: list[Case],
    cfg: TimingConfig,
    meta: RunMeta,
    *,
    log: Callable[[str], None] = print,
    seed: int = 0,
) -> list[dict]:
    """Time every case; return the rows (dicts keyed by :data:`COLUMNS`).

    A case whose provider cannot run it becomes a ``skipped`` row with the reason; a case that
    fails while being timed becomes an ``error`` row.  Ratios use the dense case of the same
    group measured earlier in this run.
    """
    torch.set_num_threads(cfg.threads)
    if any(c.device == "cuda" for c in cases) and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 goals are stated with TF32 off
        torch.backends.cudnn.allow_tf32 = False
    dense_p50: dict[tuple, float] = {}
    rows: list[dict] = []
    told: set[tuple[str, str]] = set()
    for i, case in enumerate(cases, 1):
        row = dict.fromkeys(COLUMNS, "")
        row.update(_case_fields(case))
        row.update(
            machine=meta.machine, cpu_model=meta.cpu_model, threads=meta.threads, torch=meta.torch,
            triton=meta.triton, sparsekern=meta.sparsekern, commit=meta.commit, command=meta.command,
        )  # fmt: skip
        row["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        row["load_avg_1m"] = round(_loadavg()[0], 2)
        try:
            prep = prepare(case, seed=seed)
            t = time_fn(prep.fn, case.device, cfg)
        except Skip as exc:
            row.update(status="skipped", reason=str(exc))
            goal = goal_for(row)
            if goal is not None:
                row.update(goal=goal.label, goal_met="not run")
            key = (case.provider, str(exc))
            ok, _ = availability(case.provider, case.device)
            if ok or key not in told:  # an unavailable provider is announced once
                told.add(key)
                log(f"[{i}/{len(cases)}] {case.id}: skipped ({exc})")
            rows.append(row)
            continue
        except Exception as exc:  # a failing case must not end the sweep; the row says why
            row.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            goal = goal_for(row)
            if goal is not None:
                row.update(goal=goal.label, goal_met="not run")
            log(f"[{i}/{len(cases)}] {case.id}: ERROR {row['reason']}")
            rows.append(row)
            continue
        finally:
            gc.collect()
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
        )
        key = case.dense_key()
        if case.provider == "dense":
            dense_p50[key] = t.p50
        ref = dense_p50.get(key)
        if ref is not None:
            row["dense_p50"] = ref * 1e3
            row["speedup_vs_dense"] = round(ref / t.p50, 4)
            row["dense_ref"] = f"dense {key[0]} {key[1]}"
        goal = goal_for(row)
        if goal is not None and row["speedup_vs_dense"] != "":
            row["goal"] = goal.label
            row["goal_met"] = "met" if row["speedup_vs_dense"] >= goal.speedup else "missed"
        sp = ""
        if row["speedup_vs_dense"] != "":
            sp = f"  x{row['speedup_vs_dense']:.2f} vs dense"
            if case.op == "rebuild":  # a rebuild is not a replacement for a dense pass: state its cost
                sp = f"  = {1 / row['speedup_vs_dense']:.2f} dense fwd+bwd of the layer"
        gl = f"  goal {goal.speedup:g}x: {row['goal_met']}" if row["goal"] else ""
        log(
            f"[{i}/{len(cases)}] {case.id}: {_fmt_s(t.p50)} (p20 {t.p20 * 1e3:.3f}, p80 {t.p80 * 1e3:.3f} ms)"
            f"{sp}{gl}"
        )
        rows.append(row)
        sys.stdout.flush()
    meta.load_end = _loadavg()
    return rows
