"""Memory of one layer (or a ResNet-18) during training, sparse against dense (issue 20, item 7).

Each configuration runs in a fresh subprocess, which reports its resident set size (RSS, from
/proc/self/statm) above a baseline taken after the inputs exist:

  built   after the model and optimizer are constructed
  steady  after three training steps (forward, backward, optimizer step; gradients kept, as
          between steps of a loop that zeroes them with set_to_none at the start of the next)
  build peak  the high-water mark (ru_maxrss) above the baseline while constructing
  train peak  the high-water mark (VmHWM, reset after construction) above the baseline while training
  peak after step 1  the same over steps 2 and 3 (the first step also runs sparsekern.choice's probes)
  scratch  of steady, the C++ kernels' grow-only per-thread scratch (torch.ops.sparsekern.scratch_held):
          padded copies / grids of the largest batch a layer saw, tiles, accumulators; kept between
          calls so that steady-state calls do not fault fresh pages in

The children run with a fixed glibc mmap threshold (64 KiB), so every tensor of that size or more
is mapped on allocation and unmapped on free, and RSS tracks live tensors.
A small sparse and dense model trains once before the baseline, so the libraries' pages and the
thread pools are in it.  The optimizer is SGD with momentum (dense: torch.optim; sparse:
sparsekern.optim, whose momentum is compact on G).

    python -m sparsekern.bench.memory                      # 4096x4096 linear, batch 128, 90 %
    python -m sparsekern.bench.memory --model resnet18 --batch 32
    python -m sparsekern.bench --memory                    # both, as one Markdown table

A sparse layer's memory goal (steady and peak <= the dense layer's) holds for the compact gradient
layout ("sparse-compact"); the dense layout keeps a dense ``weight.grad`` for stock optimizers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def hwm() -> int:
    """VmHWM, the peak RSS since the last reset_hwm()."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets the peak RSS
        f.write("5")


def child(args) -> dict:
    import torch
    from torch import nn

    import sparsekern

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    # load the libraries and start the thread pools first, so the baseline holds their pages
    tiny = sparsekern.sparsify_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 36, 8)), 0.5)
    warm = sparsekern.optim.SGD(tiny.parameters(), lr=0.01, momentum=0.9, model=tiny)
    for layout in ("dense", "compact"):
        warm._set_grad_layout(layout)
        tiny(torch.randn(2, 3, 8, 8)).sum().backward()
        warm.step()
    nn.Linear(64, 64)(torch.randn(2, 64)).sum().backward()
    del tiny, warm
    if args.model == "linear":
        x = torch.randn(args.batch, args.features)
        y = torch.randn(args.batch, args.features)
    else:
        x = torch.randn(args.batch, 3, 32, 32)
        y = torch.randint(0, 10, (args.batch,))
    base, base_peak = rss(), peak()
    scratch0 = sum(torch.ops.sparsekern.scratch_held())
    keep: set = set()
    if args.model == "linear":
        model = nn.Sequential(nn.Linear(args.features, args.features))
    else:  # the benchmark suite's ResNet-18 (stem and head stay dense)
        from sparsekern.bench.providers import build_model

        model, _, keep = build_model("resnet18", args.nf)
    if args.kind != "dense":
        sparsekern.sparsify_(model, sparsekern.SparsityConfig(args.sparsity, keep_dense=tuple(sorted(keep))))
    if args.kind == "dense":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        layout = "compact" if args.kind == "sparse-compact" else "dense"
        opt = sparsekern.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, model=model, grad_layout=layout)
    built, built_peak = rss() - base, peak()
    reset_hwm()

    def loss_of(out):
        return (out - y).square().mean() if args.model == "linear" else nn.functional.cross_entropy(out, y)

    for step in range(3):
        if step == 1:  # the first step also decides each layer's path (sparsekern.choice's probe)
            first_peak = hwm() - base
            reset_hwm()
        opt.zero_grad(set_to_none=True)
        loss_of(model(x)).backward()
        opt.step()
    steady, later_peak = rss() - base, hwm() - base
    scratch = sum(torch.ops.sparsekern.scratch_held()) - scratch0
    return {
        "model": args.model,
        "kind": args.kind,
        "built_mb": built / 2**20,
        "steady_mb": steady / 2**20,
        "build_peak_mb": (built_peak - max(base, base_peak)) / 2**20,
        "train_peak_mb": max(first_peak, later_peak) / 2**20,
        "later_peak_mb": later_peak / 2**20,
        "scratch_mb": scratch / 2**20,
    }


def main(argv: list[str] | None = None) -> list[str]:
    """Run the three configurations (each in a fresh process) and print their table; returns its lines."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m sparsekern.bench.memory", description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("linear", "resnet18"), default="linear")
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--nf", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kind", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.kind is not None:
        print(json.dumps(child(args)))
        return []
    rows = []
    for kind in ("dense", "sparse-dense-grad", "sparse-compact"):
        cmd = [sys.executable, "-m", "sparsekern.bench.memory", *argv, "--kind", kind]
        # a fixed mmap threshold: glibc's adaptive one (up to 32 MB) would keep some freed tensors
        # in the heap, and RSS would then vary from run to run by tens of MB
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    what = f"{args.features}x{args.features} linear" if args.model == "linear" else f"ResNet-18 nf{args.nf}"
    lines = [
        f"{what}, batch {args.batch}, sparsity {args.sparsity}: MB above the baseline (RSS)",
        "",
        "| model | built | build peak | steady | train peak | peak after step 1 | of steady: kernel scratch |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = ("built_mb", "build_peak_mb", "steady_mb", "train_peak_mb", "later_peak_mb", "scratch_mb")
    for r in rows:
        lines.append(f"| {r['kind']} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
