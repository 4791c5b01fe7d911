"""Command line of the benchmark suite: ``python -m sparsekern.bench --help``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from .cases import DTYPES, LAYOUTS, MODES, OPS, PRESETS, PROVIDERS, SHAPE_SETS, all_shapes, expand
from .report import _goal_lines, markdown_full, markdown_summary, plot, read_csv, update_readme, write_csv
from .runner import collect_meta, run_cases
from .timing import TimingConfig

__all__ = ["main", "build_parser"]

# per-preset timing budgets: quick keeps the whole run near a minute on 2 cores
_TIMING = {
    "smoke": dict(warmup=1, min_time=0.0, block_time=0.0, min_samples=2, max_samples=2),
    "quick": dict(warmup=1, min_time=0.15, block_time=0.01, min_samples=3, max_samples=20),
    "full": dict(warmup=2, min_time=0.2, block_time=0.02, min_samples=5, max_samples=30),
}


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
        prog="python -m sparsekern.bench",
        description="Time sparsekern against dense PyTorch and torch.sparse; write CSV, Markdown, PNG.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="case set to start from (default: quick)")
    p.add_argument("--ops", type=_list("--ops", OPS), help=f"comma list from {list(OPS)}")
    p.add_argument("--providers", type=_list("--providers", PROVIDERS), help=f"comma list from {list(PROVIDERS)}")
    p.add_argument("--modes", type=_list("--modes", MODES), help=f"comma list from {list(MODES)}")
    p.add_argument("--shapes", type=_list("--shapes"), help=f"shape sets {sorted(SHAPE_SETS)} or shape names")
    p.add_argument("--sparsity", type=_list("--sparsity", conv=float), help="comma list of sparsities in [0, 1)")
    p.add_argument("--layouts", type=_list("--layouts", LAYOUTS), help=f"comma list from {list(LAYOUTS)}")
    p.add_argument("--dtypes", type=_list("--dtypes", DTYPES), help=f"comma list from {list(DTYPES)}")
    p.add_argument("--batch", type=_list("--batch", conv=int), help="batch sizes (default: each shape's own)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads, pinned (default: the CPUs this process may use)")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timed calls per case")
    p.add_argument("--out", default="benchmarks/results", help="directory for the CSV, Markdown and PNG")
    p.add_argument("--name", default=None, help="file stem (default: bench_<device>_<preset>)")
    p.add_argument("--readme", default=None, help="write the summary between the bench markers of this README")
    p.add_argument("--from-csv", default=None, help="make the Markdown/PNG/README from an existing CSV; time nothing")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--list", action="store_true", help="print the selected cases and exit")
    return p


def _selection(args):
    sel = PRESETS[args.preset]
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
    over["device"] = args.device
    return replace(sel, **over)


def _write_reports(rows, out: Path, name: str, readme: str | None, no_plot: bool, log=print) -> dict:
    csv_path = out / f"{name}.csv"
    md_path = out / f"{name}.md"
    png_path = out / f"{name}.png"
    png = None if no_plot else plot(rows, png_path)
    links = {"all cases (Markdown)": md_path.name, "CSV": csv_path.name}
    if png:
        links["plot"] = png_path.name
    md_path.write_text(markdown_full(rows, links=links))
    log(f"wrote {md_path}" + (f" and {png}" if png else ""))
    if readme:
        readme_p = Path(readme)
        base = readme_p.resolve().parent
        rel = lambda p: os.path.relpath(p.resolve(), base)  # noqa: E731
        rlinks = {"all cases (Markdown)": rel(md_path), "CSV": rel(csv_path)}
        img = f"\n\n![speedup against sparsity]({rel(png_path)})\n" if png else ""
        section = (
            "## Benchmarks\n\n"
            "Generated by `python -m sparsekern.bench` from the CSV of the run below; do not edit by hand "
            "(rerun with `--readme README.md`, or `--from-csv <csv> --readme README.md`)."
            f"{img}\n" + markdown_summary(rows, links=rlinks)
        )
        update_readme(readme_p, section)
        log(f"updated the benchmark section of {readme_p}")
    return {"csv": csv_path, "md": md_path, "png": png}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m sparsekern.bench``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    name = args.name or f"bench_{args.device}_{args.preset}"
    if args.from_csv:
        rows = read_csv(args.from_csv)
        if not rows:
            raise SystemExit(f"--from-csv: {args.from_csv} has no rows")
        _write_reports(rows, Path(args.from_csv).parent, Path(args.from_csv).stem, args.readme, args.no_plot)
        return 0
    sel = _selection(args)
    try:
        cases = expand(sel)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if not cases:
        raise SystemExit("no case matches the selection (check that --shapes fit --ops; see --list)")
    if args.list:
        for c in cases:
            print(c.id)
        print(f"{len(cases)} cases")
        return 0
    threads = args.threads or _default_threads()
    if threads < 1:
        raise SystemExit(f"--threads: expected a positive count, got {threads}")
    tk = dict(_TIMING[args.preset])
    if args.min_time is not None:
        if args.min_time < 0:
            raise SystemExit(f"--min-time: expected seconds >= 0, got {args.min_time}")
        tk["min_time"] = args.min_time
    cfg = TimingConfig(threads=threads, **tk)
    command = "python -m sparsekern.bench " + " ".join(shlex.quote(a) for a in argv)
    meta = collect_meta(threads, command.strip())
    print(f"{len(cases)} cases; {meta.cpu_model}; {threads} thread(s); torch {meta.torch}; commit {meta.commit}; "
          f"load {meta.load_start[0]:.2f}")  # fmt: skip
    rows = run_cases(cases, cfg, meta)
    csv_path = write_csv(rows, out / f"{name}.csv")
    print(f"wrote {csv_path} ({len(rows)} rows); load average at the end {meta.load_end[0]:.2f}")
    if any(r.get("goal") for r in rows):
        print("goals (DESIGN.md section 6):")
        print("\n".join(_goal_lines(rows)))
    _write_reports(rows, out, name, args.readme, args.no_plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
