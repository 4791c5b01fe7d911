"""CPU speed of the ``cpp`` backend against dense PyTorch and ``torch.sparse``, fwd+bwd, fp32.

    python benchmarks/bench_cpu.py                 # the full table (a few minutes on 2 cores)
    python benchmarks/bench_cpu.py --quick         # a handful of cases
    python benchmarks/bench_cpu.py --filter conv   # cases whose name contains "conv"

Every case times one training step of the layer -- forward, then the input and weight
gradients -- for each provider in the same process, with ``torch.utils.benchmark`` (warm-up,
inputs built outside the timed region, median with p20 / p80), at a pinned thread count:

* ``dense``: ``F.linear`` / ``F.conv2d`` with autograd (MKL / oneDNN);
* ``cpp``: ``sparsekern.sparse_linear`` / ``sparse_conv2d`` with ``backend="cpp"``;
* ``torch_sparse`` (linear): CSR weight (BSR for block layouts), ``W @ xᵀ`` forward, ``Wᵀ @ dyᵀ``
  input gradient (transposed weight built outside the timed region), ``torch.sparse.sampled_addmm``
  weight gradient on the pattern in CSR form.  PyTorch has no sparse conv2d, so conv cases have
  none.

The speedup is ``dense / cpp`` measured in the same run, printed with its goal (DESIGN.md section
6) and met / missed.  Results go to ``benchmarks/results/cpu_kernels.{md,csv}``.  The case lists
(:func:`linear_cases`, :func:`conv_cases`) are plain data, so other runners can reuse them.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.utils import benchmark as tbench

import sparsekern
from sparsekern.bench.runner import _cpu_model
from sparsekern.kernels.cpu import conv2d_algo, load_library
from sparsekern.testing import make_block_mask, make_mask

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# goal: speedup of cpp over dense, fwd+bwd (DESIGN.md section 6)
LINEAR_GOALS = {0.90: 5.0, 0.95: 8.0, 0.98: 15.0}
CONV_GOALS = {0.90: 3.0, 0.95: 5.0}
BLOCK_GOAL = 6.0  # block 16 / 32 at 90 %


@dataclass(frozen=True)
class LinearBench:
    batch: int
    in_features: int
    out_features: int
    sparsity: float
    layout: str = "unstructured"
    block: int | None = None

    @property
    def name(self) -> str:
        lay = "unstr" if self.layout == "unstructured" else f"block{self.block}"
        return f"linear {self.in_features}->{self.out_features} N{self.batch} {lay} {self.sparsity:.0%}"

    @property
    def goal(self) -> float | None:
        if self.layout == "block":
            return BLOCK_GOAL if self.sparsity == 0.90 and self.block in (16, 32) else None
        return LINEAR_GOALS.get(self.sparsity)


@dataclass(frozen=True)
class ConvBench:
    batch: int
    in_channels: int
    out_channels: int
    hw: int
    stride: int
    sparsity: float
    layout: str = "unstructured"
    block: int | None = None
    count: int = 1  # how many times the shape occurs among ResNet-18's 3x3 convs

    @property
    def name(self) -> str:
        lay = "unstr" if self.layout == "unstructured" else f"block{self.block}"
        return (
            f"conv3x3 {self.in_channels}->{self.out_channels} {self.hw}x{self.hw} s{self.stride} "
            f"N{self.batch} {lay} {self.sparsity:.0%}"
        )

    @property
    def goal(self) -> float | None:
        if self.layout == "block":
            return BLOCK_GOAL if self.sparsity == 0.90 and self.block in (16, 32) else None
        return CONV_GOALS.get(self.sparsity)


# ResNet-18 (CIFAR: 3x3 stem, no max-pool) 3x3 convs inside the residual stages:
# (in, out, input size, stride, how many)
RESNET18_3X3 = [
    (64, 64, 32, 1, 4),
    (64, 128, 32, 2, 1),
    (128, 128, 16, 1, 3),
    (128, 256, 16, 2, 1),
    (256, 256, 8, 1, 3),
    (256, 512, 8, 2, 1),
    (512, 512, 4, 1, 3),
]


def linear_cases(quick: bool = False) -> list[LinearBench]:
    """Linear cases: unstructured 90 / 95 / 98 %, block 16 / 32 at 90 %."""
    if quick:
        return [LinearBench(256, 768, 3072, 0.90), LinearBench(256, 768, 3072, 0.98),
                LinearBench(256, 768, 3072, 0.90, "block", 32)]
    out = []
    for n, k, m in ((256, 768, 3072), (2048, 768, 3072), (256, 4096, 4096)):
        out += [LinearBench(n, k, m, s) for s in (0.90, 0.95, 0.98)]
        out += [LinearBench(n, k, m, 0.90, "block", b) for b in (16, 32)]
    return out


def conv_cases(quick: bool = False) -> list[ConvBench]:
    """ResNet-18 3x3 conv layers (CIFAR shapes), batch 32 and 128; unstructured 90 / 95 %, block 16 / 32 at 90 %."""
    if quick:
        return [ConvBench(32, 128, 128, 16, 1, 0.90, count=3), ConvBench(32, 128, 128, 16, 1, 0.90, "block", 16, 3)]
    out = []
    for n in (32, 128):
        for c, o, hw, s, cnt in RESNET18_3X3:
            out += [ConvBench(n, c, o, hw, s, sp, count=cnt) for sp in (0.90, 0.95)]
            if n == 32:
                out += [ConvBench(n, c, o, hw, s, 0.90, "block", b, cnt) for b in (16, 32)]
    return out


# ------------------------------------------------------------------------------------------------
# step functions: each returns a zero-argument callable doing forward + input and weight gradients
# ------------------------------------------------------------------------------------------------


def _linear_steps(c: LinearBench) -> dict:
    g = torch.Generator().manual_seed(0)
    shape = (c.out_features, c.in_features)
    if c.layout == "block":
        mask = make_block_mask(shape, (c.block, c.block), 1 - c.sparsity, generator=g)
    else:
        mask = make_mask(shape, "random", 1 - c.sparsity, generator=g)
    x = torch.randn(c.batch, c.in_features, generator=g).requires_grad_(True)
    w = torch.randn(shape, generator=g).mul_(mask).requires_grad_(True)
    dy = torch.randn(c.batch, c.out_features, generator=g)
    kw = {"layout": c.layout, "block_size": c.block}

    def dense():
        x.grad = w.grad = None
        F.linear(x, w).backward(dy)

    def cpp():
        x.grad = w.grad = None
        sparsekern.sparse_linear(x, w, None, mask, backend="cpp", **kw).backward(dy)

    steps = {"dense": dense, "cpp": cpp, "_density": float(mask.float().mean())}
    wd, xd = w.detach(), x.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR / BSR support is in beta state"
        mask_csr = mask.to(torch.float32).to_sparse_csr()
    if c.layout == "block":
        # torch.sparse BSR: forward and input gradient as BSR @ dense (CPU kernels exist for both),
        # the weight gradient through sampled_addmm on the block pattern in CSR form (no BSR variant)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w_bsr = wd.to_sparse_bsr((c.block, c.block))
            wt_bsr = wd.t().contiguous().to_sparse_bsr((c.block, c.block))

        def torch_sparse_bsr():
            y_t = torch.sparse.mm(w_bsr, xd.t())
            dx_t = torch.sparse.mm(wt_bsr, dy.t())
            dw = torch.sparse.sampled_addmm(mask_csr, dy.t(), xd, beta=0.0)
            return y_t, dx_t, dw

        if c.in_features % c.block == 0 and c.out_features % c.block == 0:
            steps["torch_sparse"] = torch_sparse_bsr
    if c.layout == "unstructured":
        w_csr = wd.to_sparse_csr()
        wt_csr = wd.t().contiguous().to_sparse_csr()

        def torch_sparse():
            y_t = torch.sparse.mm(w_csr, xd.t())  # forward, [M, N]
            dx_t = torch.sparse.mm(wt_csr, dy.t())  # input gradient, [K, N]
            dw = torch.sparse.sampled_addmm(mask_csr, dy.t(), xd, beta=0.0)  # weight gradient on the mask
            return y_t, dx_t, dw

        steps["torch_sparse"] = torch_sparse
    return steps


def _conv_steps(c: ConvBench) -> dict:
    g = torch.Generator().manual_seed(0)
    shape = (c.out_channels, c.in_channels, 3, 3)
    if c.layout == "block":
        mask = make_block_mask(shape, (c.block, c.block), 1 - c.sparsity, generator=g)
    else:
        mask = make_mask(shape, "random", 1 - c.sparsity, generator=g)
    x = torch.randn(c.batch, c.in_channels, c.hw, c.hw, generator=g).requires_grad_(True)
    w = torch.randn(shape, generator=g).mul_(mask).requires_grad_(True)
    ho = (c.hw + 2 - 3) // c.stride + 1
    dy = torch.randn(c.batch, c.out_channels, ho, ho, generator=g)
    kw = {"layout": c.layout, "block_size": c.block}

    def dense():
        x.grad = w.grad = None
        F.conv2d(x, w, None, c.stride, 1).backward(dy)

    def cpp():
        x.grad = w.grad = None
        sparsekern.sparse_conv2d(x, w, None, mask, None, c.stride, 1, backend="cpp", **kw).backward(dy)

    return {"dense": dense, "cpp": cpp, "_algo": conv_algos(c, mask), "_density": float(mask.float().mean())}


def conv_algos(c: ConvBench, mask: torch.Tensor) -> str:
    """The cpp algorithm auto picks for the case's forward / input gradient / weight gradient with
    this mask ("direct" or "gemm", see ``sparsekern.kernels.cpu.conv2d_algo``), as "fwd/dx/dw"."""
    from sparsekern.formats import Pattern

    shape = tuple(mask.shape)
    pat = Pattern(mask, "block", (c.block, c.block)) if c.layout == "block" else Pattern(mask)
    xs = [c.batch, c.in_channels, c.hw, c.hw]
    return "/".join(conv2d_algo(op, xs, list(shape), c.stride, 1, pattern=pat) for op in ("fwd", "dx", "dw"))


def _time(fn, min_run_time: float) -> dict:
    fn()  # warm-up (also builds and caches the pattern metadata)
    m = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    t = torch.tensor(m.times)
    return {
        "median_ms": m.median * 1e3,
        "p20_ms": float(t.quantile(0.2)) * 1e3,
        "p80_ms": float(t.quantile(0.8)) * 1e3,
        "runs": len(m.times),
    }


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except Exception:
        return "unknown"


def run(cases, min_run_time: float) -> list[dict]:
    rows = []
    for c in cases:
        steps = _linear_steps(c) if isinstance(c, LinearBench) else _conv_steps(c)
        algo = steps.pop("_algo", None)  # not timed: what the conv ops pick for this case
        density = steps.pop("_density")  # the mask's real density (block grids round it)
        times = {name: _time(fn, min_run_time) for name, fn in steps.items()}
        dense, cpp = times["dense"]["median_ms"], times["cpp"]["median_ms"]
        ts = times.get("torch_sparse", {}).get("median_ms")
        speedup = dense / cpp
        goal = c.goal
        row = {
            "case": c.name,
            "op": "linear" if isinstance(c, LinearBench) else "conv2d",
            **{k: v for k, v in asdict(c).items()},
            "dense_ms": dense,
            "dense_p20_ms": times["dense"]["p20_ms"],
            "dense_p80_ms": times["dense"]["p80_ms"],
            "cpp_ms": cpp,
            "cpp_p20_ms": times["cpp"]["p20_ms"],
            "cpp_p80_ms": times["cpp"]["p80_ms"],
            "torch_sparse_ms": ts,
            "speedup_vs_dense": speedup,
            "speedup_vs_torch_sparse": (ts / cpp) if ts else None,
            "goal": goal,
            "met": (speedup >= goal) if goal else None,
            "conv_algo": algo,
            "mask_density": density,
        }
        rows.append(row)
        ts_txt = f"{ts:9.2f} ms ({ts / cpp:5.1f}x)" if ts else "        n/a        "
        verdict = "" if goal is None else ("met" if row["met"] else "MISSED")
        goal_txt = f">= {goal:g}x {verdict}" if goal else ""
        algo_txt = f"   algo {row['conv_algo']}" if row["conv_algo"] else ""
        if abs(density - (1 - c.sparsity)) > 0.02:
            algo_txt += f"   (mask density {density:.2f}: the block grid cannot hold {1 - c.sparsity:.0%})"
        print(
            f"{c.name:52s} dense {dense:9.2f} ms  cpp {cpp:9.2f} ms  {speedup:5.2f}x   torch.sparse {ts_txt}   {goal_txt}"
            f"{algo_txt}",
            flush=True,
        )
    return rows


def resnet_totals(rows: list[dict]) -> list[dict]:
    """Sum over ResNet-18's 3x3 convs (each shape times its count) per batch, sparsity and layout."""
    groups: dict = {}
    for r in rows:
        if r["op"] != "conv2d":
            continue
        key = (r["batch"], r["sparsity"], r["layout"], r["block"])
        g = groups.setdefault(key, {"dense": 0.0, "cpp": 0.0, "n": 0})
        g["dense"] += r["dense_ms"] * r["count"]
        g["cpp"] += r["cpp_ms"] * r["count"]
        g["n"] += 1
    out = []
    for (n, sp, layout, block), g in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if g["n"] != len(RESNET18_3X3):
            continue  # partial set of shapes (--quick / --filter)
        goal = (BLOCK_GOAL if sp == 0.90 and block in (16, 32) else None) if layout == "block" else CONV_GOALS.get(sp)
        s = g["dense"] / g["cpp"]
        lay = "unstr" if layout == "unstructured" else f"block{block}"
        out.append({
            "case": f"ResNet-18 all 3x3 convs N{n} {lay} {sp:.0%}", "dense_ms": g["dense"], "cpp_ms": g["cpp"],
            "speedup_vs_dense": s, "goal": goal, "met": (s >= goal) if goal else None,
        })
    return out


def _density_note(r) -> str:
    d = r.get("mask_density")
    if d is None or abs(d - (1 - r["sparsity"])) <= 0.02:
        return ""
    return f" (mask density {d:.2f})"


def _fmt(v, spec=".2f"):
    return "" if v is None else format(v, spec)


def write_results(rows, totals, meta, stem: str) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    csv_path = os.path.join(RESULTS, f"{stem}.csv")
    fields = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    fields += list(meta.keys())
    with open(csv_path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields, restval="")
        wr.writeheader()
        for r in rows:
            wr.writerow({**r, **meta})
    md = [
        "# CPU kernels: `cpp` backend vs dense PyTorch and torch.sparse (fwd+bwd, fp32)",
        "",
        f"- command: `{meta['command']}`",
        f"- CPU: {meta['cpu']}; threads: {meta['threads']}; torch {meta['torch']}; kernels ISA: {meta['isa']}; "
        f"kernel threading: {meta['parallel']}",
        f"- date: {meta['date']}; commit: {meta['commit']}; load average before / after: "
        f"{meta['load_before']} / {meta['load_after']}",
        "- time = one step: forward + input gradient + weight gradient; median of `torch.utils.benchmark` "
        "runs (p20-p80 in brackets); speedup = dense / cpp in the same run",
        "- conv algo: what the cpp conv2d ops auto-pick for forward / input gradient / weight gradient "
        "(direct sparse convolution or implicit GEMM)",
        "",
        "| case | dense ms | cpp ms [p20-p80] | torch.sparse ms | speedup vs dense | vs torch.sparse | goal | met | conv algo |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['case']}{_density_note(r)} | {r['dense_ms']:.2f} | {r['cpp_ms']:.2f} [{r['cpp_p20_ms']:.2f}-{r['cpp_p80_ms']:.2f}] | "
            f"{_fmt(r['torch_sparse_ms'])} | {r['speedup_vs_dense']:.2f}x | {_fmt(r['speedup_vs_torch_sparse'])}"
            f"{'x' if r['speedup_vs_torch_sparse'] else ''} | {_fmt(r['goal'], 'g')} | "
            f"{'' if r['met'] is None else ('yes' if r['met'] else '**no**')} | {r.get('conv_algo') or ''} |"
        )
    if totals:
        md += ["", "Summed over ResNet-18's 3x3 convs (each shape times its count in the network):", "",
               "| set | dense ms | cpp ms | speedup | goal | met |", "|---|---:|---:|---:|---:|---|"]
        for t in totals:
            md.append(
                f"| {t['case']} | {t['dense_ms']:.1f} | {t['cpp_ms']:.1f} | {t['speedup_vs_dense']:.2f}x | "
                f"{_fmt(t['goal'], 'g')} | {'' if t['met'] is None else ('yes' if t['met'] else '**no**')} |"
            )
    with open(os.path.join(RESULTS, f"{stem}.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"wrote {os.path.join(RESULTS, stem + '.md')} and {csv_path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a handful of cases")
    ap.add_argument("--filter", default="", help="only cases whose name contains this")
    ap.add_argument("--min-run-time", type=float, default=1.0, help="seconds per provider per case")
    ap.add_argument("--out", default="cpu_kernels", help="results file stem under benchmarks/results")
    args = ap.parse_args(argv)
    ok, why = load_library()
    if not ok:
        print(f"cannot benchmark: {why}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    cases = [c for c in linear_cases(args.quick) + conv_cases(args.quick) if args.filter in c.name]
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = run(cases, args.min_run_time)
    totals = resnet_totals(rows)
    for t in totals:
        verdict = "" if t["goal"] is None else (f">= {t['goal']:g}x " + ("met" if t["met"] else "MISSED"))
        print(f"{t['case']:52s} dense {t['dense_ms']:9.1f} ms  cpp {t['cpp_ms']:9.1f} ms  {t['speedup_vs_dense']:5.2f}x   {verdict}")
    meta = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "isa": torch.ops.sparsekern.cpu_isa(),
        "parallel": torch.ops.sparsekern.parallel_backend(),
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "commit": _commit(),
        "load_before": load_before,
        "load_after": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    write_results(rows, totals, meta, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
