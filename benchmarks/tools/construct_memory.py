"""Peak memory of constructing a sparse layer, over the dense layer it replaces (issue 20, item 7).

tracemalloc does not see torch's allocations, so each case runs in a fresh subprocess and reads
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the process's peak resident set) before and after
building the layer; the dense row (``nn.Linear`` / ``nn.Conv2d``) is measured the same way, and the
table prints the sparse peak minus the dense one.  A memory measurement, not a timing one: it
is safe to run next to other jobs.

    PYTHONPATH=. python benchmarks/tools/construct_memory.py
    PYTHONPATH=. python benchmarks/tools/construct_memory.py --case "linear 4096 4096 0.9 unstructured"
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASES = [
    "linear 4096 4096 0.9 unstructured",
    "linear 4096 4096 0.9 block",
    "linear 4096 11008 0.9 unstructured",
    "conv 512 512 0.9 unstructured",
]

_CHILD = r"""
import json, resource, sys
import torch
from torch import nn
import sparsekern
torch.manual_seed(0)
kind, a, b, sparsity, layout, which = sys.argv[1:7]
a, b, sparsity = int(a), int(b), float(sparsity)
block = 32 if layout == "block" else None
from sparsekern.kernels.cpu import load_library
load_library()  # the C++ library's pages are a one-time cost of the process, not of a layer
# and so are the first call's lazy imports and thread pools: a small layer of the same kind first
if kind == "linear":
    sparsekern.SparseLinear(256, 256, bias=False, sparsity=sparsity, layout=layout, block_size=block)
else:
    sparsekern.SparseConv2d(64, 64, 3, bias=False, sparsity=sparsity, layout=layout, block_size=block)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if kind == "linear":
    if which == "dense":
        layer = nn.Linear(a, b, bias=False)
    else:
        layer = sparsekern.SparseLinear(a, b, bias=False, sparsity=sparsity, layout=layout, block_size=block)
else:
    if which == "dense":
        layer = nn.Conv2d(a, b, 3, padding=1, bias=False)
    else:
        layer = sparsekern.SparseConv2d(a, b, 3, padding=1, bias=False, sparsity=sparsity, layout=layout,
                                        block_size=block)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_kib": after - before}))
"""


def measure(case: str, which: str) -> float:
    """Peak resident growth (MiB) while constructing ``case`` (``which``: ``dense`` or ``sparse``)."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, *case.split(), which], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"] / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", help="'linear|conv IN OUT SPARSITY unstructured|block' (repeatable)")
    args = ap.parse_args()
    print(f"{'case':40s} {'dense MiB':>10s} {'sparse MiB':>11s} {'over dense':>11s}")
    for case in args.case or CASES:
        dense, sparse = measure(case, "dense"), measure(case, "sparse")
        print(f"{case:40s} {dense:10.1f} {sparse:11.1f} {sparse - dense:+11.1f}")


if __name__ == "__main__":
    main()
