"""Where the time of a ``cpp`` training step goes, next to dense PyTorch (fp32, CPU).

    python benchmarks/tools/profile_cpu.py            # the linear goal shapes, 90 / 95 / 98 %
    python benchmarks/tools/profile_cpu.py --quick    # 768->3072 batch 256 only

``python -m sparsekern.bench --preset cpu-kernels`` gives the speedup of a whole step; this
script explains it.  Per case, in one
process and at a pinned thread count (median of ``torch.utils.benchmark`` runs):

* each of the three ops alone (forward, input gradient, weight gradient), dense vs ``cpp``, with
  the useful work of the sparse op in GFLOP/s (2 * nnz * batch per op) beside dense's;
* the memory floor that the API puts under every sparse step, whatever the kernels do: the
  weight is a dense parameter, so the forward and the input gradient each read it once (to pick
  the values inside the pattern; measured as one pass over the weight), and the weight gradient
  is a dense tensor, written once (measured as filling a tensor of that size);
* the ``cpp`` step on 1 and on 2 threads (load balance and shared-cache limits);
* dense bf16 against dense fp32: on a CPU with AMX or AVX-512 BF16, oneDNN's bf16 GEMM is what a
  bf16 sparse kernel would have to beat.

Results go to ``benchmarks/results/cpu_profile.md`` (``--out`` to change the stem).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils import benchmark as tbench

from sparsekern.bench import cpu_model, git_commit
from sparsekern.formats import pattern_of
from sparsekern.kernels.cpu import CppBackend, load_library
from sparsekern.testing import make_mask

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")

SHAPES = [(256, 768, 3072), (2048, 768, 3072), (256, 4096, 4096)]
SPARSITIES = [0.90, 0.95, 0.98]


def _ms(fn, min_run_time: float) -> float:
    fn()
    t = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=min_run_time).median * 1e3


def profile_case(n: int, k: int, m: int, sparsity: float, threads: int, mrt: float) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = make_mask((m, k), "random", 1 - sparsity, generator=g)
    w = torch.randn(m, k, generator=g) * mask
    x = torch.randn(n, k, generator=g)
    dy = torch.randn(n, m, generator=g)
    pat = pattern_of(mask)
    nnz = int(mask.sum())
    be = CppBackend()
    ops = {
        "fwd": (lambda: F.linear(x, w), lambda: be.linear_fwd(x, w, None, pat)),
        "dx": (lambda: dy @ w, lambda: be.linear_dx(dy, w, pat)),
        "dw": (lambda: dy.t() @ x, lambda: be.linear_dw(dy, x, pat)),
    }
    torch.set_num_threads(threads)
    row = {"case": f"linear {k}->{m} N{n} unstr {sparsity:.0%}", "nnz": nnz}
    for name, (dense, cpp) in ops.items():
        row[f"{name}_dense_ms"] = _ms(dense, mrt)
        row[f"{name}_cpp_ms"] = _ms(cpp, mrt)
    dense_flop, sparse_flop = 2.0 * n * k * m, 2.0 * n * nnz
    row["dense_gflops"] = 3 * dense_flop / sum(row[f"{o}_dense_ms"] for o in ops) / 1e6
    row["cpp_gflops"] = 3 * sparse_flop / sum(row[f"{o}_cpp_ms"] for o in ops) / 1e6
    # memory floor: one read of the dense weight (fwd and dx each), one write of dW
    row["read_w_ms"] = _ms(lambda: w.sum(), mrt)
    out = torch.empty_like(w)
    row["write_dw_ms"] = _ms(lambda: out.zero_(), mrt)
    row["floor_ms"] = 2 * row["read_w_ms"] + row["write_dw_ms"]

    def step():
        be.linear_fwd(x, w, None, pat)
        be.linear_dx(dy, w, pat)
        be.linear_dw(dy, x, pat)

    torch.set_num_threads(1)
    row["cpp_step_1t_ms"] = _ms(step, mrt)
    torch.set_num_threads(threads)
    row["cpp_step_ms"] = _ms(step, mrt)
    row["dense_step_ms"] = sum(row[f"{o}_dense_ms"] for o in ops)
    # dense bf16 (oneDNN) vs dense fp32, forward + both gradients
    xb, wb, dyb = x.bfloat16(), w.bfloat16(), dy.bfloat16()
    row["dense_bf16_step_ms"] = _ms(lambda: (F.linear(xb, wb), dyb @ wb, dyb.t() @ xb), mrt)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="768->3072 batch 256 only")
    ap.add_argument("--min-run-time", type=float, default=0.5, help="seconds per measurement")
    ap.add_argument("--out", default="cpu_profile", help="results file stem under benchmarks/results")
    args, (ok, why) = ap.parse_args(argv), load_library()
    if not ok:
        print(f"the cpp backend is not usable: {why}", file=sys.stderr)
        return 2
    shapes = SHAPES[:1] if args.quick else SHAPES
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = []
    for n, k, m in shapes:
        for s in SPARSITIES:
            r = profile_case(n, k, m, s, args.threads, args.min_run_time)
            rows.append(r)
            print(
                f"{r['case']:38s} fwd {r['fwd_dense_ms']:7.2f}/{r['fwd_cpp_ms']:6.2f}  dx {r['dx_dense_ms']:7.2f}/"
                f"{r['dx_cpp_ms']:6.2f}  dw {r['dw_dense_ms']:7.2f}/{r['dw_cpp_ms']:6.2f} ms (dense/cpp)  "
                f"GFLOP/s dense {r['dense_gflops']:5.0f} cpp {r['cpp_gflops']:5.0f}  floor {r['floor_ms']:5.2f} ms  "
                f"step 1t/{args.threads}t {r['cpp_step_1t_ms']:6.2f}/{r['cpp_step_ms']:6.2f}  "
                f"dense bf16 {r['dense_bf16_step_ms']:6.2f} vs fp32 {r['dense_step_ms']:6.2f}",
                flush=True,
            )
    cmd = "python benchmarks/tools/profile_cpu.py" + (" --quick" if args.quick else "")
    md = [
        "# Where a `cpp` linear training step spends its time (fp32, CPU)",
        "",
        f"- command: `{cmd}`; CPU: {cpu_model()}; threads: {args.threads}; torch {torch.__version__}",
        f"- date: {_dt.datetime.now():%Y-%m-%d %H:%M}; commit: {git_commit()}; load average before / after: "
        f"{load_before} / {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
        "- ms are medians of `torch.utils.benchmark` runs; GFLOP/s counts useful work (dense: 2·N·K·M per op, "
        "cpp: 2·N·nnz per op); floor = two reads of the dense weight + one write of the dense weight gradient "
        "(what the dense-parameter API costs every sparse step); dense bf16 = oneDNN bf16 (AMX where present)",
        "",
        "| case | fwd dense / cpp ms | dx dense / cpp ms | dw dense / cpp ms | GFLOP/s dense / cpp | floor ms "
        "| cpp step 1 thread / N threads ms | dense step fp32 / bf16 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        md.append(
            f"| {r['case']} | {r['fwd_dense_ms']:.2f} / {r['fwd_cpp_ms']:.2f} | {r['dx_dense_ms']:.2f} / "
            f"{r['dx_cpp_ms']:.2f} | {r['dw_dense_ms']:.2f} / {r['dw_cpp_ms']:.2f} | {r['dense_gflops']:.0f} / "
            f"{r['cpp_gflops']:.0f} | {r['floor_ms']:.2f} | {r['cpp_step_1t_ms']:.2f} / {r['cpp_step_ms']:.2f} | "
            f"{r['dense_step_ms']:.2f} / {r['dense_bf16_step_ms']:.2f} |"
        )
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{args.out}.md")
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
