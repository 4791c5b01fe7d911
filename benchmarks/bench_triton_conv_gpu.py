"""GPU benchmark: ``SparseConv2d`` on the Triton backend against ``nn.Conv2d`` (cuDNN).

ResNet-18 (CIFAR style, 3x3 stem) 3x3 conv layers at batch 128 for 32x32 and 64x64 inputs,
sparsity 80-98 %, unstructured and block 16/32/64 layouts, bf16 and fp32 (TF32 off), forward +
backward (input and weight gradient).  Timed with ``triton.testing.do_bench`` (median, p20, p80);
every speedup is ``cuDNN p50 / sparse p50`` from the same run.  The DESIGN.md goal (block-sparse
fwd+bwd at 90 % in bf16: >= 4x over cuDNN) is printed beside the cases it applies to.  Each
sparse result is checked against the dense conv with the masked weight before timing.

Usage (one command on a machine with a CUDA GPU)::

    python benchmarks/bench_triton_conv_gpu.py             # default sweep
    python benchmarks/bench_triton_conv_gpu.py --quick     # the goal cases (a few minutes)
    python benchmarks/bench_triton_conv_gpu.py --dry-run   # list the cases; needs no GPU

Writes ``benchmarks/results/triton_conv_gpu_<device>.csv`` and ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# ResNet-18 3x3 convs of the CIFAR variant for a 32x32 input: (name, C_in, C_out, H_in, stride)
RESNET18_32 = [
    ("layer1", 64, 64, 32, 1),
    ("layer2.0.conv1", 64, 128, 32, 2),
    ("layer2", 128, 128, 16, 1),
    ("layer3.0.conv1", 128, 256, 16, 2),
    ("layer3", 256, 256, 8, 1),
    ("layer4.0.conv1", 256, 512, 8, 2),
    ("layer4", 512, 512, 4, 1),
]
LAYOUTS = ("unstructured", "block16", "block32", "block64")
SPARSITIES = (0.8, 0.9, 0.95, 0.98)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GOAL = {"layout_prefix": "block", "sparsity": 0.9, "dtype": "bf16", "ratio": 4.0}


def cases(quick: bool):
    out = []
    for res in (32, 64):
        for name, cin, cout, h, stride in RESNET18_32:
            h = h * res // 32
            for layout in LAYOUTS:
                for s in SPARSITIES:
                    for dt in DTYPES:
                        if quick and not (layout == "block64" and s == 0.9 and dt == "bf16"):
                            continue
                        out.append(dict(input=res, layer=name, cin=cin, cout=cout, h=h, stride=stride,
                                        layout=layout, sparsity=s, dtype=dt))
    return out


def _mask(w, layout, sparsity, gen):
    from sparsekern import masks

    if layout == "unstructured":
        return masks.random_mask(w.shape, sparsity, generator=gen).to(w.device), None
    b = int(layout[len("block"):])
    return masks.random_mask(w.shape, sparsity, layout="block", block_size=b, generator=gen).to(w.device), b


def run_case(c, do_bench):
    import sparsekern as sk

    dev = torch.device("cuda")
    dtype = DTYPES[c["dtype"]]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, c["cin"], c["h"], c["h"], device=dev, dtype=dtype, requires_grad=True)
    w = (torch.randn(c["cout"], c["cin"], 3, 3, device=dev, dtype=dtype) * 0.05).requires_grad_()
    mask, block = _mask(w, c["layout"], c["sparsity"], gen)
    kw = dict(layout="block" if block else "unstructured", block_size=block, backend="triton")

    def sparse_step():
        y = sk.sparse_conv2d(x, w, None, mask, None, c["stride"], 1, **kw)
        y.backward(dy)

    def dense_step():
        y = F.conv2d(x, w, None, c["stride"], 1)
        y.backward(dy)

    with torch.no_grad():
        y_ref = F.conv2d(x.float(), (w * mask).float(), None, c["stride"], 1)
    dy = torch.randn(y_ref.shape, device=dev, dtype=dtype)
    y = sk.sparse_conv2d(x, w, None, mask, None, c["stride"], 1, **kw)
    err = ((y.float() - y_ref).norm() / y_ref.norm().clamp_min(1e-12)).item()
    row = dict(c)
    row["rel_err_fwd"] = err
    for prov, fn in (("cudnn", dense_step), ("triton", sparse_step)):
        p50, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=[x, w])
        row[f"{prov}_p50_ms"], row[f"{prov}_p20_ms"], row[f"{prov}_p80_ms"] = p50, p20, p80
    row["speedup"] = row["cudnn_p50_ms"] / row["triton_p50_ms"]
    goal = GOAL["ratio"] if (c["layout"].startswith(GOAL["layout_prefix"]) and c["sparsity"] == GOAL["sparsity"]
                             and c["dtype"] == GOAL["dtype"]) else None
    row["goal"] = goal
    row["met"] = None if goal is None else row["speedup"] >= goal
    return row


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip()
    except OSError:
        return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the goal cases (block 64, 90 %%, bf16)")
    ap.add_argument("--dry-run", action="store_true", help="list the cases and exit (no GPU needed)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    todo = cases(args.quick)
    if args.dry_run:
        for c in todo:
            print(c)
        print(f"{len(todo)} cases")
        return 0
    if not torch.cuda.is_available():
        print("bench_triton_conv_gpu: no CUDA device is visible; run it on a machine with a GPU "
              "(use --dry-run to list the cases)", file=sys.stderr)
        return 2
    import triton
    from triton.testing import do_bench

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    device = torch.cuda.get_device_name()
    meta = dict(device=device, torch=torch.__version__, triton=triton.__version__, commit=_commit(),
                time=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), host=platform.node())
    rows = []
    for i, c in enumerate(todo):
        r = {**run_case(c, do_bench), **meta}
        rows.append(r)
        mark = "" if r["goal"] is None else f"  goal >= {r['goal']:.0f}x: {'met' if r['met'] else 'MISSED'}"
        print(f"[{i + 1}/{len(todo)}] {c['input']}px {c['layer']:15s} {c['layout']:12s} s={c['sparsity']:.2f} "
              f"{c['dtype']}: cuDNN {r['cudnn_p50_ms']:.3f} ms, triton {r['triton_p50_ms']:.3f} ms, "
              f"{r['speedup']:.2f}x (rel err {r['rel_err_fwd']:.1e}){mark}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"triton_conv_gpu_{re.sub(r'[^A-Za-z0-9]+', '_', device).strip('_').lower()}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    lines = [f"# SparseConv2d (Triton) vs nn.Conv2d (cuDNN), fwd+bwd, batch 128 — {device}", "",
             f"`python benchmarks/bench_triton_conv_gpu.py{' --quick' if args.quick else ''}` · torch "
             f"{meta['torch']} · triton {meta['triton']} · commit {meta['commit']} · {meta['time']}", "",
             "| input | layer | layout | sparsity | dtype | cuDNN ms | Triton ms | speedup | goal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        goal = "" if r["goal"] is None else f"≥{r['goal']:.0f}× {'met' if r['met'] else 'missed'}"
        lines.append(f"| {r['input']} | {r['layer']} | {r['layout']} | {r['sparsity']:.2f} | {r['dtype']} | "
                     f"{r['cudnn_p50_ms']:.3f} | {r['triton_p50_ms']:.3f} | {r['speedup']:.2f}× | {goal} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.csv and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
