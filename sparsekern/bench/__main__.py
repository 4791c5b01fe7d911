"""Command line of the benchmark suite: ``python -m sparsekern.bench --help``.

python -m sparsekern.bench --preset quick                  # about a minute on 2 cores
python -m sparsekern.bench --preset cpu-kernels            # the CPU goal cases
python -m sparsekern.bench --preset gpu-linear --list      # list a preset's cases (no GPU needed)
python -m sparsekern.bench --from-csv benchmarks/results/cpu_kernels.csv --readme README.md
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from ..env import prog_name
from .cases import DTYPES, LAYOUTS, MODES, OPS, PRESETS, PROVIDERS, SHAPE_SETS, all_shapes, expand
from .report import _goal_lines, read_csv, write_csv, write_readme, write_reports
from .runner import collect_meta, run_cases
from .timing import TimingConfig

__all__ = ["main", "build_parser"]


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _list(kind: str, allowed=None, conv=str):
    def parse(text: str):
        vals = [v.strip() for v in text.split(",") if v.strip()]
        if not vals:
            raise argparse.ArgumentTypeError(f"{kind}: expected a comma-separated list, got {text!r}")
        out = []
        for v in vals:
            try:
                x = conv(v)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{kind}: {v!r} is not a valid {conv.__name__}") from None
            if allowed is not None and x not in allowed:
                raise argparse.ArgumentTypeError(f"{kind}: unknown value {v!r}; expected one of {list(allowed)}")
            out.append(x)
        return out

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog_name("sparsekern-bench", "sparsekern.bench"),
        description="Time sparsekern against dense PyTorch and torch.sparse; write CSV, Markdown, PNG.",
        epilog="presets:\n" + "\n".join(f"  {n:18s} {p.about}" for n, p in PRESETS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=list(PRESETS), default="quick", help="case set to start from (default: quick)")
    p.add_argument("--ops", type=_list("--ops", OPS), help=f"comma list from {list(OPS)}")
    p.add_argument("--providers", type=_list("--providers", PROVIDERS), help=f"comma list from {list(PROVIDERS)}")
    p.add_argument("--modes", type=_list("--modes", MODES), help=f"comma list from {list(MODES)}")
    p.add_argument("--shapes", type=_list("--shapes"), help=f"shape sets {sorted(SHAPE_SETS)} or shape names")
    p.add_argument("--sparsity", type=_list("--sparsity", conv=float), help="comma list of sparsities in [0, 1)")
    p.add_argument("--layouts", type=_list("--layouts", LAYOUTS), help=f"comma list from {list(LAYOUTS)}")
    p.add_argument("--dtypes", type=_list("--dtypes", DTYPES), help=f"comma list from {list(DTYPES)}")
    p.add_argument("--batch", type=_list("--batch", conv=int), help="batch sizes (default: each shape's own)")
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: the preset's (gpu-* presets: cuda)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads, pinned (default: the CPUs this process may use)"
    )
    p.add_argument("--min-time", type=float, default=None, help="seconds of timed calls per case")
    p.add_argument("--out", default="benchmarks/results", help="directory for the CSV, Markdown and PNG")
    p.add_argument("--name", default=None, help="file stem (default: the preset's, else bench_<device>_<preset>)")
    p.add_argument("--readme", default=None, help="add or replace this run's part of the bench section of this README")
    p.add_argument(
        "--from-csv",
        nargs="+",
        default=None,
        metavar="CSV",
        help="make the Markdown/PNG (and with --readme the README part) of existing CSVs; time nothing",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument(
        "--check",
        action="store_true",
        help="compare each compiled kernel with the reference before timing (on for smoke and gpu-*)",
    )
    p.add_argument("--list", action="store_true", help="print the selected cases and exit")
    p.add_argument(
        "--memory",
        action="store_true",
        help="measure training memory instead of time (a 4096x4096 linear and a ResNet-18, sparse against dense, "
        "each in a fresh process; --sparsity, --batch apply) and write <out>/memory_cpu.md",
    )
    p.add_argument("--compile-only", type=int, metavar="SM", default=None,
                   help="compile every Triton kernel x tuning configuration for NVIDIA sm_SM with Triton's ptxas "
                        "(no GPU needed) and check shared memory; a -quick preset limits it to bf16 / fp32-tf32 "
                        "at block 64")  # fmt: skip
    return p


def _overrides(args) -> dict:
    over = {}
    if args.ops:
        over["ops"] = args.ops
    if args.providers:
        over["providers"] = args.providers
    if args.modes:
        over["modes"] = args.modes
        over["ops_modes"] = {}
        over["provider_modes"] = {}
    if args.shapes:
        known = set(SHAPE_SETS) | set(all_shapes())
        bad = [s for s in args.shapes if s not in known]
        if bad:
            raise SystemExit(f"--shapes: unknown {bad}; sets: {sorted(SHAPE_SETS)}; shapes: {sorted(all_shapes())}")
        over["shapes"] = args.shapes
        over["op_shapes"] = {}
    if args.sparsity:
        bad = [s for s in args.sparsity if not 0.0 <= s < 1.0]
        if bad:
            raise SystemExit(f"--sparsity: expected values in [0, 1), got {bad}")
        over["sparsities"] = args.sparsity
        over["e2e_sparsities"] = sorted({0.0, *args.sparsity})
        over["op_sparsities"] = {}
        over["provider_sparsities"] = {}
    if args.layouts:
        over["layouts"] = args.layouts
        over["e2e_layouts"] = args.layouts
        over["op_layouts"] = {}
    if args.dtypes:
        over["dtypes"] = args.dtypes
    if args.batch:
        over["batches"] = args.batch
        over["op_batches"] = {}
    if args.device:
        over["device"] = args.device
    return over


def _selections(args) -> list:
    """The preset's selections with the command line's overrides applied to each."""
    over = _overrides(args)
    return [replace(sel, **over) for sel in PRESETS[args.preset].selections]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _memory(args) -> int:
    """``--memory``: the tables of :mod:`sparsekern.bench.memory`, written to ``<out>/memory_cpu.md``."""
    from ..env import cpu_isa
    from . import memory
    from .runner import cpu_model

    sparsity = str((args.sparsity or [0.9])[0])
    runs = [["--model", "linear", "--batch", str((args.batch or [128])[0])]]
    runs += [["--model", "resnet18", "--nf", nf, "--batch", str((args.batch or [32])[0])] for nf in ("20", "64")]
    lines = [f"Training memory, sparse against dense ({cpu_model()}, isa {cpu_isa()}; "
             "`python -m sparsekern.bench --memory`).", ""]  # fmt: skip
    for run in runs:
        lines += memory.main([*run, "--sparsity", sparsity]) + [""]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "memory_cpu.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m sparsekern.bench``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset]
    if args.compile_only is not None:
        if _interpreting():
            raise SystemExit("--compile-only: unset TRITON_INTERPRET (it compiles the GPU kernels)")
        from .compile import compile_kernels

        return compile_kernels(args.compile_only, quick=args.preset.endswith("-quick"))
    if args.memory:
        return _memory(args)
    if args.from_csv:
        for path in args.from_csv:
            rows = read_csv(path)
            if not rows:
                raise SystemExit(f"--from-csv: {path} has no rows")
            out = write_reports(rows, path, with_plot=not args.no_plot)
            print(f"wrote {out['md']}" + (f" and {out['png']}" if out["png"] else ""))
        if args.readme:
            write_readme(args.readme, args.from_csv)
            print(f"updated the benchmark section of {args.readme}")
        return 0
    try:
        cases = expand(_selections(args))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if not cases:
        raise SystemExit("no case matches the selection (check that --shapes fit --ops; see --list)")
    if args.list:
        for c in cases:
            print(c.id)
        print(f"{len(cases)} cases")
        return 0
    device = args.device or preset.device
    if device == "cuda" and _interpreting():
        raise SystemExit("TRITON_INTERPRET is set: unset it to time compiled kernels on the GPU")
    threads = args.threads or _default_threads()
    if threads < 1:
        raise SystemExit(f"--threads: expected a positive count, got {threads}")
    tk = dict(preset.timing)
    if args.min_time is not None:
        if args.min_time < 0:
            raise SystemExit(f"--min-time: expected seconds >= 0, got {args.min_time}")
        tk["min_time"] = args.min_time
    cfg = TimingConfig(threads=threads, **tk)
    command = "python -m sparsekern.bench " + " ".join(shlex.quote(a) for a in argv)
    meta = collect_meta(threads, command.strip())
    print(f"{len(cases)} cases; {meta.cpu_model}; {threads} thread(s); torch {meta.torch}; commit {meta.commit}; "
          f"load {meta.load_start[0]:.2f}")  # fmt: skip
    rows = run_cases(cases, cfg, meta, check=args.check or preset.check)
    name = args.name or preset.stem or f"bench_{device}_{args.preset}"
    csv_path = write_csv(rows, Path(args.out) / f"{name}.csv")
    print(f"wrote {csv_path} ({len(rows)} rows); load average at the end {meta.load_end[0]:.2f}")
    if any(r.get("goal") or r.get("goal_met") for r in rows):
        print("goals (DESIGN.md section 6):")
        print("\n".join(_goal_lines(rows)))
    out = write_reports(rows, csv_path, with_plot=not args.no_plot)
    print(f"wrote {out['md']}" + (f" and {out['png']}" if out["png"] else ""))
    if args.readme:
        write_readme(args.readme, [csv_path])
        print(f"updated the benchmark section of {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
