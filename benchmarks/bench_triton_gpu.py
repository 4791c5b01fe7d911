"""GPU benchmark of the ``triton`` backend's linear kernels against cuBLAS and torch.sparse.

For each shape (``tokens x in -> out``, tokens = batch x seq), layout (unstructured, blocks 16-128),
sparsity, dtype (bf16, fp16, fp32 with TF32 off, fp32 with TF32 on) and mode (fwd, bwd = dx + dW,
fwd+bwd), it times with ``triton.testing.do_bench`` (median, p20, p80 in ms):

* ``dense``: cuBLAS through ``F.linear`` / ``matmul`` on the dense weight (the baseline);
* ``triton``: the sparsekern Triton kernels (forward, input gradient on the transposed metadata,
  weight gradient on the gradient mask = weight mask);
* ``torch.sparse``: ``torch.mm`` with a BSR / CSR weight (and its transpose, built outside the
  timed region) and ``torch.sparse.sampled_addmm`` for the weight gradient, where PyTorch
  supports the combination (otherwise the row records the error).

Every speedup is ``dense p50 / provider p50`` measured in the same run, printed with the DESIGN.md
section 6 goal beside it where one applies (block 64 bf16 fwd+bwd at 90 %: >= 7x; unstructured
fp32 with TF32 off fwd+bwd at 90 %: >= 2x over cuBLAS fp32).  Before timing, each Triton result is
checked against the dense masked product (the relative error is in the CSV).

Results: ``benchmarks/results/triton_gpu_<device>.csv`` (one tidy row per case and provider, with
the device, versions and commit) and ``.md`` (tables of speedups with goals).

Usage (one command on a machine with a CUDA GPU)::

    python benchmarks/bench_triton_gpu.py            # default sweep
    python benchmarks/bench_triton_gpu.py --quick    # the goal cases and a few more (minutes)
    python benchmarks/bench_triton_gpu.py --full     # every shape / layout / sparsity / dtype
    python benchmarks/bench_triton_gpu.py --dry-run  # list the cases; needs no GPU
    python benchmarks/bench_triton_gpu.py --compile-only 90   # compile every tuning configuration for
                                                              # sm_90 with Triton's ptxas; needs no GPU
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# (name, in_features K, out_features M)
SHAPES = {
    "sq4096": (4096, 4096),
    "mlp768-up": (768, 3072),
    "mlp768-down": (3072, 768),
    "mlp1024-up": (1024, 4096),
    "mlp1024-down": (4096, 1024),
    "mlp4096-up": (4096, 11008),
    "mlp4096-down": (11008, 4096),
}
LAYOUTS = ("unstructured", "block16", "block32", "block64", "block128")
DTYPES = ("bf16", "fp16", "fp32", "fp32-tf32")
MODES = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = ("dense", "triton", "torch.sparse")
SPARSITIES = (0.5, 0.7, 0.9, 0.95, 0.98)

PRESETS = {
    # the goal cases plus enough context to read them: minutes on an H100
    "quick": dict(
        shapes=["sq4096", "mlp768-up"],
        layouts=["unstructured", "block64"],
        sparsity=[0.5, 0.9, 0.98],
        dtypes=["bf16", "fp32"],
    ),
    "default": dict(
        shapes=["sq4096", "mlp768-up", "mlp768-down", "mlp1024-up"],
        layouts=list(LAYOUTS),
        sparsity=[0.5, 0.7, 0.9, 0.95, 0.98],
        dtypes=list(DTYPES),
    ),
    "full": dict(shapes=list(SHAPES), layouts=list(LAYOUTS), sparsity=list(SPARSITIES), dtypes=list(DTYPES)),
}

_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp32-tf32": torch.float32}
_DTYPE_NAME = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp32-tf32": "float32"}

CSV_FIELDS = [
    "device", "torch", "triton", "sparsekern", "commit", "time", "command",
    "shape", "tokens", "in_features", "out_features", "layout", "block", "sparsity", "density_actual",
    "dtype", "tf32", "mode", "provider", "p50_ms", "p20_ms", "p80_ms", "tflops_effective",
    "speedup_vs_dense", "goal", "meets_goal", "max_rel_err", "error",
]  # fmt: skip


@dataclass(frozen=True)
class Case:
    shape: str
    tokens: int
    k: int
    m: int
    layout: str
    sparsity: float
    dtype: str

    @property
    def block(self) -> int | None:
        return int(self.layout[5:]) if self.layout.startswith("block") else None

    @property
    def id(self) -> str:
        return f"{self.shape}-N{self.tokens}-{self.layout}-s{self.sparsity:g}-{self.dtype}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark the sparsekern Triton linear kernels against cuBLAS and torch.sparse (needs a CUDA GPU).",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the goal cases and a few more")
    g.add_argument("--full", action="store_true", help="every shape, layout, sparsity and dtype")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="shapes (default: preset)")
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), help="layouts (default: preset)")
    p.add_argument("--sparsity", nargs="+", type=float, help="sparsity levels in [0, 1) (default: preset)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="dtypes; fp32 = TF32 off, fp32-tf32 = TF32 on")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS))
    p.add_argument("--tokens", type=int, default=8192, help="rows of x: batch x sequence length (default 8192)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per measurement (ms)")
    p.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up time per measurement (ms)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--tag", default="", help="suffix for the output file names")
    p.add_argument("--dry-run", action="store_true", help="list the cases and exit (no GPU needed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compile-only",
        type=int,
        metavar="SM",
        help="compile every kernel x tuning configuration x block size for NVIDIA sm_SM (e.g. 80, 90) without a GPU "
        "and check shared memory; --quick limits it to bf16 and fp32-tf32",
    )
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full" if args.full else "default"]
    for key in ("shapes", "layouts", "sparsity", "dtypes"):
        if getattr(args, key) is None:
            setattr(args, key, list(preset[key]))
    for s in args.sparsity:
        if not 0.0 <= s < 1.0:
            p.error(f"--sparsity: expected values in [0, 1), got {s}")
    if args.tokens < 1:
        p.error(f"--tokens: expected a positive integer, got {args.tokens}")
    return args


def cases_of(args) -> list[Case]:
    return [
        Case(shape, args.tokens, *SHAPES[shape], layout, s, dt)
        for shape in args.shapes
        for dt in args.dtypes
        for layout in args.layouts
        for s in args.sparsity
    ]


# ------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        return ""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def require_cuda() -> None:
    """Exit with a clear message (no traceback) when there is no usable CUDA GPU."""
    if os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes"):
        sys.exit("bench_triton_gpu: TRITON_INTERPRET is set; unset it to time compiled kernels on the GPU.")
    if torch.version.cuda is None and torch.version.hip is None:
        sys.exit(
            f"bench_triton_gpu: this torch ({torch.__version__}) is built without CUDA; "
            "the GPU benchmark needs a CUDA build of torch and a GPU (use --dry-run to list the cases)."
        )
    if not torch.cuda.is_available():
        sys.exit(
            "bench_triton_gpu: no CUDA device is available; run this on a machine with a GPU (--dry-run lists the cases)."
        )
    try:
        import triton  # noqa: F401
    except Exception as exc:
        sys.exit(f"bench_triton_gpu: triton is not importable ({exc}); pip install 'sparsekern[triton]'.")


# ------------------------------------------------------------------------------------------
# inputs and providers
# ------------------------------------------------------------------------------------------


def make_inputs(case: Case, seed: int):
    from sparsekern.testing import make_block_mask

    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = _TORCH_DTYPE[case.dtype]
    density = 1.0 - case.sparsity
    if case.block is None:
        mask = torch.rand(case.m, case.k, generator=g) < density
    else:
        mask = make_block_mask((case.m, case.k), (case.block, case.block), density, generator=g)
    dev = torch.device("cuda")
    w = (torch.randn(case.m, case.k, generator=g) / math.sqrt(case.k)).to(dev, dt)
    x = torch.randn(case.tokens, case.k, generator=g).to(dev, dt)
    dy = torch.randn(case.tokens, case.m, generator=g).to(dev, dt)
    return mask.to(dev), w, x, dy


def dense_fns(w, x, dy):
    import torch.nn.functional as F

    def fwd():
        return F.linear(x, w)

    def bwd():
        return dy @ w, dy.t() @ x

    def both():
        return F.linear(x, w), dy @ w, dy.t() @ x

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def triton_fns(case: Case, mask, w, x, dy):
    from sparsekern.formats import pattern_of
    from sparsekern.kernels.triton import TritonBackend

    be = TritonBackend(fp32_precision="tf32" if case.dtype == "fp32-tf32" else "ieee")
    pat = pattern_of(mask, "block", case.block) if case.block else pattern_of(mask)
    _ = pat.bsr() if case.block else pat.csr()  # metadata built once, outside the timed region

    def fwd():
        return be.linear_fwd(x, w, None, pat)

    def bwd():
        return be.linear_dx(dy, w, pat), be.linear_dw(dy, x, pat)

    def both():
        return fwd(), be.linear_dx(dy, w, pat), be.linear_dw(dy, x, pat)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def torch_sparse_fns(case: Case, mask, w, x, dy):
    from sparsekern.formats import to_torch_sparse_bsr, to_torch_sparse_csr

    if case.block:
        ws = to_torch_sparse_bsr(w, mask, case.block)
        wts = to_torch_sparse_bsr(w.t().contiguous(), mask.t().contiguous(), case.block)
        gs = to_torch_sparse_bsr(torch.zeros_like(w), mask, case.block)
    else:
        ws = to_torch_sparse_csr(w, mask)
        wts = to_torch_sparse_csr(w.t().contiguous(), mask.t().contiguous())
        gs = to_torch_sparse_csr(torch.zeros_like(w), mask)

    def fwd():
        return torch.mm(ws, x.t()).t()

    def dx():
        return torch.mm(wts, dy.t()).t()

    def dw():
        return torch.sparse.sampled_addmm(gs, dy.t(), x, beta=0.0)

    return {"fwd": fwd, "bwd": lambda: (dx(), dw()), "fwd+bwd": lambda: (fwd(), dx(), dw())}


def check_triton(case: Case, mask, w, x, dy, fns) -> float:
    """Max relative error (over fwd, dx, dW) of the Triton kernels against the dense masked fp32 product."""
    wm = w.float().masked_fill(~mask, 0)
    y_ref = x.float() @ wm.t()
    dx_ref = dy.float() @ wm
    dw_ref = (dy.float().t() @ x.float()).masked_fill(~mask, 0)
    y, dxk, dwk = fns["fwd+bwd"]()
    err = 0.0
    for got, ref in ((y, y_ref), (dxk, dx_ref), (dwk, dw_ref)):
        scale = ref.abs().max().item() or 1.0
        err = max(err, (got.float() - ref).abs().max().item() / scale)
    return err


def _flops(case: Case, mode: str, density: float) -> float:
    per = 2.0 * case.tokens * case.k * case.m * density
    return {"fwd": per, "bwd": 2 * per, "fwd+bwd": 3 * per}[mode]


def time_ms(fn, args) -> tuple[float, float, float]:
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    p50, p20, p80 = do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, quantiles=[0.5, 0.2, 0.8])
    return p50, p20, p80


def goal_of(case: Case, mode: str, provider: str):
    """The DESIGN.md section 6 goal for a row (from sparsekern.bench.goals), if one applies."""
    from sparsekern.bench.goals import goal_for

    dtype = _DTYPE_NAME[case.dtype] if case.dtype != "fp32-tf32" else "float32-tf32"  # the fp32 goal is TF32 off
    return goal_for(
        dict(
            provider=provider,
            device="cuda",
            dtype=dtype,
            layout=case.layout,
            op="linear",
            mode=mode,
            sparsity=case.sparsity,
        )
    )


# ------------------------------------------------------------------------------------------
# run and report
# ------------------------------------------------------------------------------------------


def run(args) -> list[dict]:
    import triton

    import sparsekern

    dev_name = torch.cuda.get_device_name(0)
    meta = dict(
        device=dev_name, torch=torch.__version__, triton=triton.__version__, sparsekern=sparsekern.__version__,
        commit=_commit(), time=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command="python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
    )  # fmt: skip
    rows = []
    cases = cases_of(args)
    print(f"# {dev_name}: {len(cases)} cases x modes {args.modes} x providers {args.providers}", flush=True)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for i, case in enumerate(cases, 1):
            torch.backends.cuda.matmul.allow_tf32 = case.dtype == "fp32-tf32"
            mask, w, x, dy = make_inputs(case, args.seed)
            density = mask.float().mean().item()
            base = dict(
                meta, shape=case.shape, tokens=case.tokens, in_features=case.k, out_features=case.m,
                layout=case.layout, block=case.block or "", sparsity=case.sparsity, density_actual=round(density, 5),
                dtype=_DTYPE_NAME[case.dtype], tf32=case.dtype == "fp32-tf32",
            )  # fmt: skip
            fns, errs, rel_err = {}, {}, ""
            for prov in ["dense"] + [p for p in args.providers if p != "dense"]:
                try:
                    if prov == "dense":
                        fns[prov] = dense_fns(w, x, dy)
                    elif prov == "triton":
                        fns[prov] = triton_fns(case, mask, w, x, dy)
                        rel_err = check_triton(case, mask, w, x, dy, fns[prov])
                    else:
                        fns[prov] = torch_sparse_fns(case, mask, w, x, dy)
                except Exception as exc:  # an unsupported combination is a result, not a crash
                    errs[prov] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            dense_ms = {}
            for mode in args.modes:
                line = [f"[{i}/{len(cases)}] {case.id} {mode:7s}"]
                for prov in ["dense"] + [p for p in args.providers if p != "dense"]:
                    row = dict(base, mode=mode, provider=prov, error=errs.get(prov, ""))
                    if prov == "triton":
                        row["max_rel_err"] = f"{rel_err:.3g}" if rel_err != "" else ""
                    if prov in fns:
                        try:
                            p50, p20, p80 = time_ms(fns[prov][mode], args)
                            row.update(p50_ms=round(p50, 5), p20_ms=round(p20, 5), p80_ms=round(p80, 5))
                            dens = 1.0 if prov == "dense" else density
                            row["tflops_effective"] = round(_flops(case, mode, dens) / (p50 * 1e-3) / 1e12, 2)
                            if prov == "dense":
                                dense_ms[mode] = p50
                            if mode in dense_ms:
                                row["speedup_vs_dense"] = round(dense_ms[mode] / p50, 3)
                        except Exception as exc:
                            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    goal = goal_of(case, mode, prov) if prov == "triton" else None
                    if goal is not None:
                        row["goal"] = goal.label
                        if "speedup_vs_dense" in row:
                            row["meets_goal"] = row["speedup_vs_dense"] >= goal.speedup
                    rows.append(row)
                    if prov == "dense":
                        line.append(f"dense {row.get('p50_ms', float('nan')):.3f} ms")
                    else:
                        sp = row.get("speedup_vs_dense")
                        txt = f"{prov} {sp:.2f}x" if sp is not None else f"{prov} n/a ({row['error'][:60]})"
                        if goal is not None:
                            txt += f" [goal {goal.label}: {'met' if row.get('meets_goal') else 'NOT met'}]"
                        line.append(txt)
                print(" | ".join(line), flush=True)
            del fns
            torch.cuda.empty_cache()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        wr.writeheader()
        for r in rows:
            wr.writerow(r)


def markdown(rows: list[dict]) -> str:
    """Speedup tables (dense p50 / provider p50, same run) with the goals beside them."""
    if not rows:
        return "no results\n"
    r0 = rows[0]
    out = [
        f"# Triton linear kernels vs cuBLAS on {r0['device']}",
        "",
        f"torch {r0['torch']}, triton {r0['triton']}, sparsekern {r0['sparsekern']}, commit {r0['commit']}, {r0['time']}.",
        f"Command: `{r0['command']}`",
        "",
        "Speedup = dense (cuBLAS) p50 / provider p50, measured in the same run with `triton.testing.do_bench`; "
        "bwd = input gradient + weight gradient (on the weight mask); fp32 = TF32 off, fp32-tf32 = TF32 on for both "
        "cuBLAS and Triton.  `max rel err`: Triton against the dense masked fp32 product.",
        "",
    ]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["shape"], r["tokens"], r["in_features"], r["out_features"], r["dtype"], r["tf32"])
        groups.setdefault(key, []).append(r)
    for (shape, tokens, k, m, dtype, tf32), grp in groups.items():
        out += [f"## {shape}: {tokens} x {k} -> {m}, {dtype}{' (TF32 on)' if tf32 else ''}", ""]
        head = ["layout", "sparsity", "dense fwd+bwd ms"]
        head += [f"triton {mo}" for mo in modes] + [f"torch.sparse {mo}" for mo in modes] + ["goal", "max rel err"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        cells: dict[tuple, dict] = {}
        for r in grp:
            cells.setdefault((r["layout"], r["sparsity"]), {})[(r["provider"], r["mode"])] = r
        for (layout, sp), c in cells.items():
            d = c.get(("dense", "fwd+bwd"), {})
            line = [layout, f"{float(sp) * 100:g} %", f"{d['p50_ms']:.3f}" if d.get("p50_ms") is not None else "-"]
            goal_txt, err = "", ""
            for prov in ("triton", "torch.sparse"):
                for mo in modes:
                    r = c.get((prov, mo), {})
                    sp_ = r.get("speedup_vs_dense")
                    line.append(f"{sp_:.2f}x" if sp_ is not None else ("err" if r.get("error") else "-"))
                    if prov == "triton" and r.get("goal"):
                        goal_txt = f"{r['goal']}: {'met' if r.get('meets_goal') else 'NOT met'}"
                    if prov == "triton" and r.get("max_rel_err"):
                        err = r["max_rel_err"]
            out.append("| " + " | ".join(line + [goal_txt, err]) + " |")
        out.append("")
    errors = sorted({(r["provider"], r["error"]) for r in rows if r.get("error")})
    if errors:
        out += ["## Errors", ""] + [f"- {p}: {e}" for p, e in errors] + [""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------
# ahead-of-time compilation check (no GPU needed)
# ------------------------------------------------------------------------------------------

_SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def compile_only(arch: int, quick: bool) -> int:
    """Compile every kernel / tuning configuration / block size / dtype for ``sm_<arch>``.

    Uses Triton's bundled ptxas, so it runs on a machine without a GPU; the launches are
    specialised as on 16-byte aligned tensors with sizes that are multiples of 16.
    """
    if os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes"):
        sys.exit("bench_triton_gpu: unset TRITON_INTERPRET for --compile-only (it compiles the GPU kernels).")
    import time

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sparsekern.kernels.triton import bsr, csr

    target = GPUTarget("cuda", arch, 32)
    div16 = {"N", "R", "C", "M", "K", "stride_wr", "stride_wc"}
    limit = _SMEM_LIMIT.get(arch, 99 * 1024)

    def build(fn, types, consts, warps, stages):
        sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, n in enumerate(fn.arg_names)
            if n not in consts and (sig[n].startswith("*") or n in div16)
        }
        src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
        return triton.compile(src, target=target, options=dict(num_warps=warps, num_stages=stages))

    variants = (
        [("bf16", "ieee"), ("fp32", "tf32")]
        if quick
        else [("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "ieee"), ("fp32", "tf32")]
    )
    blocks = (64,) if quick else (16, 32, 64, 128)
    n = over = 0
    worst = 0
    t0 = time.time()
    for dt, prec in variants:
        p = "*" + dt
        for blk in blocks:
            for kernel, configs, fit, types, extra in (
                (bsr._bsr_spmm_kernel, bsr._bsr_spmm_configs(), bsr._bsr_spmm_fit,
                 dict(a_ptr=p, w_ptr=p, bias_ptr=p, out_ptr=p, ptr_ptr="*i32", idx_ptr="*i32", order_ptr="*i32",
                      N="i32", R="i32", C="i32", n_rblocks="i32", stride_wr="i32", stride_wc="i32", n_hint="i32"),
                 dict(BR=blk, BC=blk, HAS_BIAS=True)),
                (bsr._bsr_sddmm_kernel, bsr._bsr_sddmm_configs(), bsr._bsr_sddmm_fit,
                 dict(dy_ptr=p, x_ptr=p, out_ptr=p, rows_ptr="*i32", cols_ptr="*i32", N="i32", M="i32", K="i32",
                      n_hint="i32"),
                 dict(BO=blk, BK=blk)),
            ):  # fmt: skip
                seen = set()
                for cfg in configs:
                    meta = fit(dict(cfg.kwargs), extra)
                    key = (tuple(sorted(meta.items())), cfg.num_warps, cfg.num_stages)
                    if key in seen:
                        continue
                    seen.add(key)
                    consts = dict(extra, PRECISION=prec, UPCAST=False, ACC=tl.float32, **meta)
                    k = build(kernel, types, consts, cfg.num_warps, cfg.num_stages)
                    n += 1
                    worst = max(worst, k.metadata.shared)
                    if k.metadata.shared > limit:
                        over += 1
                        print(f"over the shared-memory limit: {kernel.__name__} {dt}/{prec} block {blk} {meta}")
        if prec == "tf32":
            continue
        for kernel, configs, types, extra in (
            (csr._csr_spmm_kernel, csr._csr_spmm_configs(),
             dict(bt_ptr=p, w_ptr=p, bias_ptr=p, out_ptr=p, ptr_ptr="*i32", idx_ptr="*i32", order_ptr="*i32",
                  N="i32", R="i32", stride_wr="i32", stride_wc="i32", n_hint="i32", len_hint="i32"),
             dict(HAS_BIAS=True)),
            (csr._csr_sddmm_kernel, csr._csr_sddmm_configs(),
             dict(at_ptr=p, bt_ptr=p, out_ptr=p, rows_ptr="*i32", cols_ptr="*i32", nnz="i32", N="i32", K="i32",
                  n_hint="i32", nnz_hint="i32"),
             {}),
        ):  # fmt: skip
            for cfg in configs:
                k = build(kernel, types, dict(extra, ACC=tl.float32, **cfg.kwargs), cfg.num_warps, cfg.num_stages)
                n += 1
                worst = max(worst, k.metadata.shared)
        print(f"{dt}/{prec}: {n} compiled so far ({time.time() - t0:.0f} s)", flush=True)
    print(f"sm_{arch}: compiled {n} kernel variants; largest shared memory {worst} bytes (limit {limit}); {over} over")
    return 1 if over else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compile_only is not None:
        return compile_only(args.compile_only, args.quick)
    cases = cases_of(args)
    if args.dry_run:
        print(f"{len(cases)} cases x modes {args.modes} x providers {args.providers}:")
        for c in cases:
            print(f"  {c.id}  ({c.tokens} x {c.k} -> {c.m})")
        return 0
    require_cuda()
    rows = run(args)
    stem = f"triton_gpu_{_slug(torch.cuda.get_device_name(0))}{('_' + _slug(args.tag)) if args.tag else ''}"
    csv_path = args.out_dir / f"{stem}.csv"
    md_path = args.out_dir / f"{stem}.md"
    write_csv(rows, csv_path)
    md_path.write_text(markdown(rows))
    print(f"# wrote {csv_path} and {md_path}")
    print(f"# machine: {platform.node()} / {torch.cuda.get_device_name(0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
