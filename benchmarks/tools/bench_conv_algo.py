"""Per-op CPU times of the cpp conv2d algorithms -- direct (shifted views) vs implicit GEMM -- next
to dense PyTorch, for ResNet-18's CIFAR 3x3 layers; the data behind the automatic choice
(``auto_direct`` in csrc/cpu/conv2d.cpp).

    python benchmarks/tools/bench_conv_algo.py                      # N=32, 90 % unstructured
    python benchmarks/tools/bench_conv_algo.py --block 16           # block 16 x 16 at 90 %
    python benchmarks/tools/bench_conv_algo.py --layers 0,2 --rounds 9

Each op (forward, input gradient, weight gradient) is timed for dense (``F.conv2d`` /
``aten.convolution_backward`` with one output), ``gemm`` and ``direct`` (forced with
``SPARSEKERN_CPU_CONV_ALGO``) round-robin: every round calls each provider ``--reps`` times, so a
machine shared with other work slows all three alike.  Printed: the median over rounds of the
time per call (the minimum in brackets), direct / gemm, dense / (what auto picks), and the pick.
Nothing is written to disk.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from sparsekern.bench.cases import SHAPE_SETS
from sparsekern.formats import Pattern
from sparsekern.kernels.cpu import load_library
from sparsekern.testing import make_block_mask, make_mask

# (in, out, input size, stride) of ResNet-18 (CIFAR) 3x3 convs, from the benchmark registry
LAYERS = [(s.cin, s.cout, s.hw, s.stride) for s in SHAPE_SETS["resnet18-cifar-3x3"]]
ENV = "SPARSEKERN_CPU_CONV_ALGO"


def _ops(x, w, dy, meta, blk, s):
    ops = torch.ops.sparsekern
    st, pd, dl = [s, s], [1, 1], [1, 1]
    return {
        "fwd": (
            lambda: F.conv2d(x, w, None, s, 1),
            lambda: ops.conv2d_fwd(x, w, None, meta.crow_indices, meta.col_indices, blk, st, pd, dl),
        ),
        "dx": (
            lambda: torch.ops.aten.convolution_backward(
                dy, x, w, None, st, pd, dl, False, [0, 0], 1, [True, False, False]
            ),
            lambda: ops.conv2d_dx(dy, w, meta.ccol_indices, meta.row_indices, blk, list(x.shape), st, pd, dl),
        ),
        "dw": (
            lambda: torch.ops.aten.convolution_backward(
                dy, x, w, None, st, pd, dl, False, [0, 0], 1, [False, True, False]
            ),
            lambda: ops.conv2d_dw(dy, x, meta.crow_indices, meta.col_indices, blk, list(w.shape), st, pd, dl),
        ),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--block", type=int, default=0, help="block side (0: unstructured)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", default="", help="comma-separated indices into LAYERS (default: all)")
    ap.add_argument("--nf", type=int, default=64, help="network width: channels scaled by nf / 64 (ResNet-18 nf)")
    args = ap.parse_args(argv)
    ok, why = load_library()
    if not ok:
        print(f"cannot benchmark: {why}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    layers = [LAYERS[int(i)] for i in args.layers.split(",")] if args.layers else LAYERS
    layers = [(c * args.nf // 64, o * args.nf // 64, hw, s) for c, o, hw, s in layers]
    before = os.environ.get(ENV)
    print(
        f"N={args.batch} sparsity={args.sparsity:.0%} {'block' + str(args.block) if args.block else 'unstructured'} "
        f"fp32 threads={args.threads} rounds={args.rounds} reps={args.reps} isa={torch.ops.sparsekern.cpu_isa()}; "
        "ms per call: median over rounds (min)"
    )
    print(
        f"{'layer':22s} {'op':3s} {'dense':>14s} {'gemm':>14s} {'direct':>14s} {'direct/gemm':>11s} "
        f"{'dense/auto':>10s} {'auto':>6s}"
    )
    try:
        for c, o, hw, s in layers:
            g = torch.Generator().manual_seed(0)
            shape = (o, c, 3, 3)
            x, w = torch.randn(args.batch, c, hw, hw, generator=g), torch.randn(shape, generator=g)
            if args.block:
                blk2 = (args.block, args.block)
                mask = make_block_mask(shape, blk2, 1 - args.sparsity, generator=g)
                meta = Pattern(mask, "block", blk2).bsr()
                blk = list(meta.block)
            else:
                mask = make_mask(shape, "random", 1 - args.sparsity, generator=g)
                meta, blk = Pattern(mask).csr(), [1, 1]
            dy = torch.randn_like(F.conv2d(x, w, None, s, 1))
            for op, (dense, sparse) in _ops(x, w, dy, meta, blk, s).items():
                provs = [("dense", dense, None), ("gemm", sparse, "gemm"), ("direct", sparse, "direct")]
                res = {n: [] for n, _, _ in provs}
                for r in range(args.rounds + 1):  # round 0 warms up
                    for name, fn, algo in provs:
                        if algo:
                            os.environ[ENV] = algo
                        t0 = time.perf_counter()
                        for _ in range(args.reps):
                            fn()
                        if r:
                            res[name].append((time.perf_counter() - t0) / args.reps * 1e3)
                os.environ[ENV] = "auto"
                auto = torch.ops.sparsekern.conv2d_algo(
                    op, list(x.shape), list(shape), [s, s], [1, 1], [1, 1], blk, int(mask.sum())
                )
                md = {n: statistics.median(v) for n, v in res.items()}
                mn = {n: min(v) for n, v in res.items()}
                cell = [f"{md[n]:6.2f} ({mn[n]:5.2f})" for n in ("dense", "gemm", "direct")]
                print(
                    f"{f'{c}->{o} {hw}x{hw} s{s}':22s} {op:3s} {cell[0]:>14s} {cell[1]:>14s} {cell[2]:>14s} "
                    f"{md['direct'] / md['gemm']:11.2f} {md['dense'] / md[auto]:10.2f} {auto:>6s}",
                    flush=True,
                )
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before
    return 0


if __name__ == "__main__":
    sys.exit(main())
