"""What a run ran on: each sparse layer's backend, the git commit and the CPU instruction set.

A result states whether its sparse layers really ran sparse compute.  A layer pinned to the
``reference`` backend (a dense weight gradient, masked afterwards) or sent down the dense path by
the automatic choice (:mod:`sparsekern.choice`) did not, and the run is flagged
``sparse_compute: false`` with the reasons.
"""

from __future__ import annotations

import os
import subprocess

import sparsekern

__all__ = ["layer_runs", "merge_runs", "sparse_compute", "git_commit", "cpu_isa"]

NOT_SPARSE_BACKENDS = ("reference",)


def layer_runs(model) -> dict[str, str | None]:
    """``{layer: "path/backend"}`` of each sparse layer's last call (``None``: not run yet).

    ``path`` is ``sparse`` or ``dense`` (the automatic choice may run a sparse layer dense); a
    layer pinned with ``backend=`` reports ``sparse/<backend>``.
    """
    out = {}
    for name, m in sparsekern.sparse_modules(model):
        dec = getattr(m, "last_choice", None)
        if m.backend is not None:
            out[name] = f"sparse/{m.backend}"
        elif dec is not None:
            out[name] = f"{dec.path}/{dec.backend}"
        else:
            out[name] = None
    return out


def merge_runs(snapshots) -> dict[str, list[str]]:
    """``{layer: sorted distinct "path/backend"}`` over several :func:`layer_runs` snapshots."""
    out: dict[str, set] = {}
    for snap in snapshots:
        for name, ran in snap.items():
            out.setdefault(name, set())
            if ran is not None:
                out[name].add(ran)
    return {n: sorted(v) for n, v in out.items()}


def sparse_compute(runs: dict[str, list[str]]) -> tuple[bool | None, list[str]]:
    """``(whether every sparse layer ran sparse compute, the reasons it did not)``; ``None`` without sparse layers."""
    if not runs:
        return None, []
    why = []
    for name, ran in runs.items():
        for r in ran:
            path, _, backend = r.partition("/")
            if path == "dense":
                how = "" if backend == "dense" else f" ({backend})"
                why.append(f"{name}: the automatic choice ran it dense{how}")
            elif backend in NOT_SPARSE_BACKENDS:
                why.append(f"{name}: ran on the {backend} backend (dense weight gradient, then masked)")
        if not ran:
            why.append(f"{name}: never ran during training")
    return not why, why


def git_commit() -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout this package runs from."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": sha or None, "dirty": bool(status.strip())}


def cpu_isa() -> str | None:
    """The instruction set of the C++ kernels (``avx512``, ``avx2``, ``generic``), ``None`` when not built."""
    from sparsekern import env

    return env.cpu_isa()
