"""Environment report: ``python -m sparsekern.env``.

Lists versions, what is built, and which backend each op picks on each device present.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys

import torch

from . import __version__
from ._backends import BACKEND_NAMES, backend_report, get_backend


def prog_name(script: str, module: str) -> str:
    """The command name for usage lines: ``script`` when run as that console script, else ``python -m module``."""
    name = os.path.splitext(os.path.basename(sys.argv[0] if sys.argv else ""))[0]
    return script if name == script else f"python -m {module}"


def cpu_isa() -> str | None:
    """The instruction set the C++ kernels use (``avx512``, ``avx2``, ``generic``); ``None`` when they are not built."""
    try:
        from .kernels.cpu import cpu_isa as isa

        return isa()
    except Exception:  # an unbuilt or unloadable extension has no instruction set to report
        return None


def cpu_bf16() -> dict | None:
    """The bf16 path of the C++ kernels and the CPU's bf16 features; ``None`` when they are not built."""
    try:
        from .kernels.cpu import cpu_bf16 as path
        from .kernels.cpu import cpu_features

        return {"path": path(), "features": cpu_features()}
    except Exception:  # as cpu_isa: nothing to report without the extension
        return None


def report() -> dict:
    """The environment as a dict (what ``main`` prints)."""
    info = {
        "sparsekern": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "triton": None,
        "cuda_built": torch.version.cuda,
        "cpu_isa": cpu_isa(),
        "cpu_bf16": cpu_bf16(),
        "backends": {},
        "dispatch": [],
    }
    if importlib.util.find_spec("triton") is not None:
        try:
            import triton

            info["triton"] = triton.__version__
        except Exception as exc:  # a broken install is worth reporting, not crashing on
            info["triton"] = f"import failed: {exc}"
    for name in BACKEND_NAMES:
        try:
            ok, why = get_backend(name).available()
        except Exception as exc:
            ok, why = False, f"could not load: {exc}"
        info["backends"][name] = {"available": ok, "reason": why}
    devices = ["cpu"]
    # only ask about CUDA when it is built in; never initialise it otherwise
    if torch.version.cuda is not None and torch.cuda.is_available():
        devices.append("cuda")
    for dev in devices:
        for row in backend_report(dev):
            info["dispatch"].append(
                {
                    "op": row["op"],
                    "layout": row["layout"],
                    "device": dev,
                    "chosen": row["chosen"],
                    "skipped": {n: why for n, (ok, why) in row["verdicts"].items() if not ok},
                }
            )
    return info


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog=prog_name("sparsekern-env", "sparsekern.env"),
        description="Versions, builds, and the backend each op picks.",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    info = report()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"sparsekern {info['sparsekern']}  python {info['python']}  torch {info['torch']}  triton {info['triton']}")
    print(f"platform   {info['platform']}  threads {info['torch_threads']}  torch CUDA {info['cuda_built']}")
    bf = info["cpu_bf16"] or {}
    print(f"cpu        isa {info['cpu_isa']}  bf16 {bf.get('path')}  features {bf.get('features') or '-'}")
    print("backends:")
    for name, b in info["backends"].items():
        state = "available" if b["available"] else f"unavailable ({b['reason']})"
        print(f"  {name:10s} {state}")
    print("dispatch (automatic order):")
    for row in info["dispatch"]:
        print(f"  {row['op']:7s} {row['layout']:13s} {row['device']:5s} -> {row['chosen']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
