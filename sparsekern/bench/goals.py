"""The performance goals of DESIGN.md §6, as predicates over result rows; the one place they live.

The mask-change goal applies to every ``rebuild`` row; the others to rows of the library's
compiled kernels (the ``cpp``, ``triton`` and ``cuda``
backends; ``reference`` is the specification, not a fast path, and ``dense`` / ``torch.sparse``
are what the kernels are compared with) whose case matches, on a goal shape: smoke-sized shapes
(family ``tiny``) are never checked against a goal, their rows say ``smoke, no goal``.  A row
meets its goal when its speedup over its baseline (``baseline p50 / case p50``, same run) reaches
it -- dense fp32 (``dense``), or for the CPU bf16 goals, rows of ``cpp-bf16`` (the cpp kernels
under bf16 autocast), dense under bf16 autocast (``dense-bf16``); a kernel row that could not run
is reported as ``not run``.  The same goals apply to a network's
layers summed (the report's ResNet-18 3x3 sums): a sum row is a row of the family's op and layout.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Goal", "KERNEL_PROVIDERS", "GOAL_PROVIDERS", "SMOKE_FAMILIES", "NO_GOAL_SMOKE", "goal_for", "goal_fields"]

KERNEL_PROVIDERS = ("cpp", "triton", "cuda")
#: the rows goals apply to: the compiled kernels, and cpp under bf16 autocast
GOAL_PROVIDERS = (*KERNEL_PROVIDERS, "cpp-bf16")
#: the result column holding the speedup over each baseline
SPEEDUP_COLUMN = {
    "dense": "speedup_vs_dense",
    "dense-bf16": "speedup_vs_dense_bf16",
    # the faster of dense fp32 and dense under bf16 autocast in the same run: the bf16 goals are set
    # against dense bf16, and held against dense fp32 where that is faster (small ResNet planes)
    "fastest": "speedup_vs_fastest_dense",
}
SMOKE_FAMILIES = ("tiny",)  # shape families sized for tests, not for speed
NO_GOAL_SMOKE = "smoke, no goal"


@dataclass(frozen=True)
class Goal:
    text: str  # the line of the design table
    speedup: float
    baseline: str = "dense"  # the provider the speedup is measured against (a key of SPEEDUP_COLUMN)

    @property
    def label(self) -> str:
        return f">= {self.speedup:g}x ({self.text})"


def _is(row: dict, **kw) -> bool:
    return all(row.get(k) == v for k, v in kw.items())


def _sp(row: dict, *levels: float) -> bool:
    return any(abs(float(row["sparsity"]) - s) < 1e-9 for s in levels)


def goal_for(row: dict) -> Goal | None:
    """The §6 goal that applies to a result row (a dict with the CSV's case fields), if any."""
    if row.get("family") in SMOKE_FAMILIES:
        return None
    if row.get("op") == "rebuild":  # a cost, not a speedup: <= 0.05 of dense is >= 20x
        return Goal("mask change of one layer (set_mask + next step's metadata) <= 0.05 of a dense fwd+bwd", 20)
    if row.get("provider") == "cpp-bf16":
        return _cpu_bf16_goal(row) if row["device"] == "cpu" else None
    if row.get("provider") not in KERNEL_PROVIDERS:
        return None
    # the CPU goals are the cpp kernels'; the GPU goals triton's and cuda's
    if (row["device"] == "cpu") != (row["provider"] == "cpp"):
        return None
    dev, dt, layout, op = row["device"], row["dtype"], row["layout"], row["op"]
    s = float(row["sparsity"])
    if dev == "cpu":
        if dt == "float32" and row["mode"] == "fwd+bwd":
            # a linear layer's step, with (linear) or without (spmm) its bias
            if op in ("linear", "spmm") and layout == "unstructured":
                for lvl, g in ((0.9, 5), (0.95, 8), (0.98, 15)):
                    if _sp(row, lvl):
                        return Goal(f"CPU fp32 linear fwd+bwd unstructured {round(lvl * 100)} %", g)
            if op == "conv2d" and layout == "unstructured" and _resnet18_3x3(row):
                for lvl, g in ((0.9, 3), (0.95, 5)):
                    if _sp(row, lvl):
                        return Goal(f"CPU fp32 ResNet-18 3x3 conv fwd+bwd unstructured {round(lvl * 100)} %", g)
            if op in ("linear", "spmm", "conv2d") and layout in ("block16", "block32") and _sp(row, 0.9):
                return Goal(f"CPU fp32 {op} {layout} 90 %", 6)
        if op == "train_epoch" and row.get("model") == "resnet18" and layout == "unstructured":
            for lvl, g in ((0.9, 2.5), (0.95, 3.5)):
                if _sp(row, lvl):
                    return Goal(f"CPU ResNet-18 training epoch (32x32) {round(lvl * 100)} %", g)
    elif dev == "cuda" and row["mode"] == "fwd+bwd" and abs(s - 0.9) < 1e-9:
        if dt == "bfloat16" and op in ("linear", "spmm") and layout == "block64":
            return Goal("GPU bf16 block-64 matmul fwd+bwd 90 % over cuBLAS", 7)
        if dt == "float32" and op in ("linear", "spmm") and layout == "unstructured":
            return Goal("GPU fp32 (TF32 off) unstructured matmul 90 % over cuBLAS", 2)
        if (
            dt == "bfloat16"
            and op == "conv2d"
            and layout.startswith("block")
            and str(row.get("family", "")).startswith("resnet18")
        ):
            return Goal("GPU bf16 block-sparse conv fwd+bwd ResNet-18 shapes 90 % over cuDNN", 4)
    return None


def _resnet18_3x3(row: dict) -> bool:
    return row.get("family") == "resnet18-cifar" and str(row.get("kernel")) == "3"


def _cpu_bf16_goal(row: dict) -> Goal | None:
    """DESIGN.md §6's CPU bf16 line: cpp under bf16 autocast against dense under bf16 autocast."""
    op, layout = row["op"], row["layout"]
    if op == "train_epoch":
        if row.get("model") == "resnet18" and layout == "unstructured" and _sp(row, 0.9):
            return Goal("CPU bf16 autocast ResNet-18 training epoch 90 % over the fastest dense", 1.5, "fastest")
        return None
    if row["mode"] != "fwd+bwd" or row["dtype"] != "float32":
        return None
    if op in ("linear", "spmm") and layout == "unstructured":
        for lvl, g in ((0.9, 2.5), (0.95, 4), (0.98, 8)):
            if _sp(row, lvl):
                return Goal(
                    f"CPU bf16 linear fwd+bwd unstructured {round(lvl * 100)} % over the fastest dense", g, "fastest"
                )
    if op in ("linear", "spmm") and layout in ("block16", "block32") and _sp(row, 0.9):
        return Goal(f"CPU bf16 {op} {layout} 90 % over the fastest dense", 4, "fastest")
    if op == "conv2d" and layout == "unstructured" and _resnet18_3x3(row) and _sp(row, 0.9):
        return Goal("CPU bf16 ResNet-18 3x3 conv fwd+bwd unstructured 90 % over the fastest dense", 2, "fastest")
    return None


def goal_fields(row: dict) -> dict:
    """The ``goal`` / ``goal_met`` cells of a result row (``status``, ``speedup_vs_dense`` filled in).

    ``{}`` when no goal applies; ``goal_met`` is ``met`` / ``missed`` / ``not run``, or
    ``smoke, no goal`` for a kernel row of a smoke-sized shape.
    """
    if row.get("family") in SMOKE_FAMILIES and row.get("provider") in GOAL_PROVIDERS:
        return {"goal": "", "goal_met": NO_GOAL_SMOKE}
    goal = goal_for(row)
    if goal is None:
        return {}
    sp = row.get(SPEEDUP_COLUMN[goal.baseline], "")
    if row.get("status") != "ok":
        return {"goal": goal.label, "goal_met": "not run"}
    if sp in ("", None):  # measured, but its dense baseline is missing
        return {}
    return {"goal": goal.label, "goal_met": "met" if float(sp) >= goal.speedup else "missed"}
