"""Results as data: the CSV, and the Markdown tables, the plot and the README section made from it.

The README's benchmark section sits between :data:`README_START` and :data:`README_END`; it has
one part per results CSV, each opened by a ``<!-- bench:csv PATH -->`` marker naming its CSV
(relative to the README), so the whole section can always be made again from the CSVs it names.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections import defaultdict
from pathlib import Path

from .cases import DENSE_PROVIDERS, network_layers
from .goals import NO_GOAL_SMOKE, SPEEDUP_COLUMN, goal_fields, goal_for
from .runner import COLUMNS

__all__ = [
    "write_csv",
    "read_csv",
    "markdown_summary",
    "markdown_full",
    "plot",
    "update_readme",
    "readme_csvs",
    "write_readme",
    "write_reports",
    "README_START",
    "README_END",
]

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
_CSV_MARK = re.compile(r"<!-- bench:csv (\S+) -->")

_SPARSE_OPS = ("linear", "conv2d", "spmm", "sddmm")


def write_csv(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(r.get(k, "")) for k in COLUMNS})
    return path


def _cell(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def read_csv(path: str | Path) -> list[dict]:
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


def _f(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def _x(v: float) -> str:
    return f"{v:.2f}x" if v >= 0.1 else f"{v:.2g}x"


def _pct(s) -> str:
    return f"{round(float(s) * 100)} %"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in body]
    return out


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok"]


def _has_fastest(rows: list[dict]) -> bool:
    """Whether a dense baseline other than dense fp32 (dense under bf16 autocast) ran and was the
    fastest somewhere: then the tables add a "vs fastest dense" column."""
    return any(r.get("fastest_dense") not in (None, "", "dense") for r in rows)


def _vs_fastest(r: dict) -> str:
    sp = _f(r.get("speedup_vs_fastest_dense"))
    return f"{sp:.2f}x ({r['fastest_dense']})" if sp else ""


def _goal_speedup(r: dict) -> float:
    """A goal row's speedup over the goal's own baseline (dense fp32, or dense bf16 autocast)."""
    goal = goal_for(r)
    return float(r[SPEEDUP_COLUMN[goal.baseline if goal else "dense"]])


def _meta_lines(rows: list[dict], load: str | None) -> list[str]:
    r = rows[0] if rows else {}
    devices = sorted({x["device"] for x in rows})
    lines = [
        f"Command: `{r.get('command', '')}`",
        "",
        f"Machine: {r.get('cpu_model', '')} ({r.get('machine', '')}); devices: {', '.join(devices)}; "
        f"{r.get('threads', '')} thread(s) pinned; torch {r.get('torch', '')}, triton {r.get('triton', '') or '-'}, "
        f"sparsekern {r.get('sparsekern', '') or '-'} at {r.get('commit', '')}; "
        f"run started {min(x['time'] for x in rows) if rows else ''} (UTC).",
    ]
    loads = [x for x in (_f(r.get("load_avg_1m")) for r in rows) if x is not None]
    if load:
        lines += ["", f"Load average (1/5/15 min): {load}."]
    elif loads:
        lines += [
            "",
            f"1-minute load average while the cases ran: {min(loads):.2f} to {max(loads):.2f} "
            "(the machine is shared; ratios are taken within the run for that reason).",
        ]
    lines += [
        "",
        "Speedup = dense p50 / case p50, both measured in this run (above 1: faster than dense PyTorch). "
        "Times are medians of repeated calls (p20-p80 in the CSV); inputs and the mask metadata are built "
        "before timing.",
    ]
    if _has_fastest(rows):
        lines[-1] += (
            ' Dense under bf16 autocast (`dense-bf16`, fp32 master weights) ran too: "vs fastest dense" is the '
            "fastest dense of the same case and run over the case's p50, and the bf16 goals are against that fastest dense."
        )
    return lines


def _goal_lines(rows: list[dict], *, detail: bool = True) -> list[str]:
    g = [r for r in rows if r.get("goal")]
    n_smoke = sum(r.get("goal_met") == NO_GOAL_SMOKE for r in rows)
    smoke = [f"{n_smoke} kernel case(s) on smoke-sized shapes: {NO_GOAL_SMOKE}."] if n_smoke else []
    if not g:
        return ["No case in this run has a goal in DESIGN.md section 6.", *([""] + smoke if smoke else [])]
    by_goal: dict[str, list[dict]] = defaultdict(list)
    for r in g:
        by_goal[r["goal"]].append(r)
    body = []
    for label, rs in by_goal.items():
        ran = [r for r in rs if r["goal_met"] in ("met", "missed")]
        best = max(ran, key=_goal_speedup, default=None)
        not_run = sorted({f"{r['provider']}: {r['reason']}" for r in rs if r["goal_met"] == "not run"})
        body.append([
            label.split(" (", 1)[1].rstrip(")"), label.split(" (")[0], len(ran),
            sum(r["goal_met"] == "met" for r in ran),
            f"{_goal_speedup(best):.2f}x ({best['provider']}, {best['shape']}, N{best['batch']})" if best else "-",
            f"{len(rs) - len(ran)} ({'; '.join(not_run)})".replace("|", "/") if not_run else "0",
        ])  # fmt: skip
    out = _table(["case", "goal", "cases run", "met", "best speedup", "cases not run"], body)
    ran = [r for r in g if r["goal_met"] in ("met", "missed")]
    if detail and ran:
        fast = _has_fastest(rows)
        out += ["", *_table(
            ["op", "provider", "shape", "batch", "layout", "sparsity", "mode", "dense ms", "ms", "speedup",
             *(["dense bf16 ms", "vs dense bf16", "vs fastest dense"] if fast else []), "goal", "result"],
            [[r["op"], r["provider"], r["shape"], r["batch"], r["layout"], _pct(r["sparsity"]) + _density_note(r),
              r["mode"], _ms(r.get("dense_p50")), _ms(r.get("p50")), _sx(r.get("speedup_vs_dense")),
              *([_ms(r.get("dense_bf16_p50")), _sx(r.get("speedup_vs_dense_bf16")), _vs_fastest(r)] if fast else []),
              r["goal"].split(" (")[0], r["goal_met"]] for r in ran],
        )]  # fmt: skip
    return out + ([""] + smoke if smoke else [])


def _sx(v) -> str:
    x = _f(v)
    return "" if x is None else f"{x:.2f}x"


def _ms(v) -> str:
    x = _f(v)
    return "" if x is None else (f"{x:.2f}" if x < 100 else f"{x:.1f}")


def _density_note(r: dict) -> str:
    """`` (density 0.25)`` when the mask's real density is off the asked one (a block grid rounds it)."""
    d, s = _f(r.get("density")), _f(r.get("sparsity"))
    if d is None or s is None or r.get("provider") == "dense" or abs(d - (1 - s)) <= 0.02:
        return ""
    return f" (density {d:.2f})"


def _network_lines(rows: list[dict]) -> list[str]:
    """Each network's layers summed (every shape times its count), per provider / layout / sparsity.

    Uses each row's own dense time, so a sum compares like with like even when the dense
    baselines were timed beside each case.  Only complete sets of layers are summed.
    """
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in _ok(rows):
        layers = network_layers(r.get("family", ""))
        if r["provider"] in DENSE_PROVIDERS or r["shape"] not in layers or _f(r.get("dense_p50")) is None:
            continue
        key = (r["family"], r["op"], r["mode"], r["dtype"], int(float(r["batch"])), r["provider"], r["layout"],
               float(r["sparsity"]))  # fmt: skip
        groups[key][r["shape"]] = r
    body = []
    fast = _has_fastest(rows)
    for key in sorted(groups):
        family, batch, provider, layout, sp = key[0], key[4], key[5], key[6], key[7]
        layers, got = network_layers(family), groups[key]
        if set(got) != set(layers):
            continue
        dense = sum(float(got[n]["dense_p50"]) * c for n, c in layers.items())
        ms = sum(float(got[n]["p50"]) * c for n, c in layers.items())
        bf16 = [_f(got[n].get("dense_bf16_p50")) for n in layers]
        bf16 = sum(b * c for b, c in zip(bf16, layers.values())) if None not in bf16 else None
        first = next(iter(got.values()))
        g = goal_fields({**first, "shape": family, "status": "ok", "speedup_vs_dense": dense / ms,
                         "speedup_vs_dense_bf16": bf16 / ms if bf16 else "",
                         "speedup_vs_fastest_dense": min(dense, bf16 or dense) / ms})  # fmt: skip
        extra = []
        if fast:
            best = min(dense, bf16 or dense)
            extra = [f"{bf16:.1f}" if bf16 else "", _sx(bf16 / ms if bf16 else None), _sx(best / ms)]
        body.append([family, batch, provider, layout, _pct(sp), f"{dense:.1f}", f"{ms:.1f}", f"{dense / ms:.2f}x",
                     *extra, g.get("goal", "").split(" (")[0], g.get("goal_met", "")])  # fmt: skip
    if not body:
        return []
    n = sum(network_layers(body[0][0]).values())
    head = ["network", "batch", "provider", "layout", "sparsity", "dense ms", "ms", "speedup"]
    head += [*(["dense bf16 ms", "vs dense bf16", "vs fastest dense"] if fast else []), "goal", "result"]
    return [
        f"Each network's convs summed: every distinct layer shape's time times the number of layers of that "
        f"shape ({n} layers for ResNet-18's 3x3 convs in the residual stages), against dense summed the same way.",
        "",
        *_table(head, body),
        "",
    ]


def _vs_torch_sparse_lines(rows: list[dict]) -> list[str]:
    """The compiled kernels against torch.sparse on the cases both ran (``torch.sparse p50 / kernel p50``)."""
    ts: dict[tuple, float] = {}
    kern = []
    for r in _ok(rows):
        key = (r["op"], r["mode"], r["shape"], r["batch"], r["layout"], r["sparsity"], r["dtype"], r["device"])
        if r["provider"] == "torch.sparse":
            ts[key] = float(r["p50"])
        elif r["provider"] in ("cpp", "triton", "cuda"):
            kern.append((key, r))
    groups: dict[tuple, list[float]] = defaultdict(list)
    for key, r in kern:
        if key in ts:
            fmt = "CSR" if r["layout"] == "unstructured" else "BSR"
            groups[(r["op"], r["mode"], r["dtype"], r["provider"], fmt)].append(ts[key] / float(r["p50"]))
    if not groups:
        return []
    body = [[*k, len(v), f"{min(v):.2f}x-{max(v):.2f}x", _x(_geomean(v))] for k, v in sorted(groups.items())]
    return [
        "Speed over torch.sparse (torch.sparse p50 / kernel p50) on the cases both ran:",
        "",
        *_table(["op", "mode", "dtype", "provider", "torch.sparse weight", "cases", "range", "geo. mean"], body),
        "",
    ]


def _op_summary(rows: list[dict], op: str) -> list[str]:
    rs = [r for r in _ok(rows) if r["op"] == op and r["provider"] != "dense" and _f(r["speedup_vs_dense"])]
    if not rs:
        return []
    sps = sorted({float(r["sparsity"]) for r in rs})
    groups: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rs:
        groups[(r["mode"], r["provider"], r["layout"])][float(r["sparsity"])].append(float(r["speedup_vs_dense"]))
    body = []
    for key in sorted(groups):
        cells = [_x(_geomean(groups[key][s])) if groups[key].get(s) else "" for s in sps]
        body.append([*key, *cells])
    n_shapes = len({(r["shape"], r["batch"]) for r in rs})
    return [
        f"**{op}**: geometric mean of the speedup over {n_shapes} shape/batch combination(s).",
        "",
        *_table(["mode", "provider", "layout", *[_pct(s) for s in sps]], body),
        "",
    ]


def _e2e_lines(rows: list[dict]) -> list[str]:
    rs = [r for r in _ok(rows) if r["op"] in ("train_step", "train_epoch")]
    if not rs:
        return []
    body = []
    fast = _has_fastest(rows)
    for r in sorted(
        rs,
        key=lambda r: (r["op"], r["shape"], r["provider"] not in DENSE_PROVIDERS, r["provider"], r["layout"],
                       float(r["sparsity"])),
    ):  # fmt: skip
        sp = _f(r["speedup_vs_dense"])
        body.append([
            r["op"], r["dims"], r["provider"], r["layout"],
            _pct(r["sparsity"]) if r["provider"] not in DENSE_PROVIDERS else "dense",
            f"{float(r['p50']):.1f}", f"{float(r['p20']):.1f}-{float(r['p80']):.1f}", f"{sp:.2f}x" if sp else "",
            *([_vs_fastest(r)] if fast else []),
        ])  # fmt: skip
    head = ["op", "model", "provider", "layout", "sparsity", "p50 ms", "p20-p80 ms", "speedup"]
    return _table(head + (["vs fastest dense"] if fast else []), body) + [""]


def _rebuild_lines(rows: list[dict]) -> list[str]:
    rs = [r for r in _ok(rows) if r["op"] == "rebuild"]
    if not rs:
        return []
    body = [
        [r["shape"], r["layout"], _pct(r["sparsity"]), f"{float(r['p50']):.3f}",
         f"{float(r['p50']) / float(r['dense_p50']):.2f}" if _f(r["dense_p50"]) else ""]
        for r in rs
    ]  # fmt: skip
    return [
        "Mask change: the layer's set_mask plus all the index metadata its next forward and backward read "
        "(CSR/BSR with the transposed indices, the gradient pattern); the last column is its cost in units of "
        "one dense fwd+bwd of the same layer in this run (goal: at most 0.05).",
        "",
        *_table(["shape", "layout", "sparsity", "p50 ms", "x dense fwd+bwd"], body),
        "",
    ]


def _skip_lines(rows: list[dict]) -> list[str]:
    reasons: dict[tuple[str, str], int] = defaultdict(int)
    for r in rows:
        if r.get("status") in ("skipped", "error"):
            reasons[(r["provider"], f"{r['status']}: {r['reason']}")] += 1
    if not reasons:
        return []
    body = [[p, n, why.replace("|", "/")] for (p, why), n in sorted(reasons.items())]
    return ["Providers or cases not run:", "", *_table(["provider", "cases", "reason"], body), ""]


def markdown_summary(rows: list[dict], *, load: str | None = None, links: dict[str, str] | None = None) -> str:
    """The summary (goals, per-op speedups, end to end, rebuild, skips) as Markdown."""
    out = _meta_lines(rows, load) + [""]
    if links:
        out += [" · ".join(f"[{k}]({v})" for k, v in links.items()), ""]
    out += ["#### Goals (DESIGN.md section 6)", "", *_goal_lines(rows), ""]
    for title, lines in (
        ("Networks (layers summed)", _network_lines(rows)),
        ("Against torch.sparse", _vs_torch_sparse_lines(rows)),
        ("End to end (sparsify_ against the same dense model)", _e2e_lines(rows)),
        ("Kernels", [line for op in _SPARSE_OPS for line in _op_summary(rows, op)]),
        ("Metadata rebuild", _rebuild_lines(rows)),
        ("Not run", _skip_lines(rows)),
    ):
        if lines:
            out += [f"#### {title}", "", *lines]
    return "\n".join(out).rstrip() + "\n"


def markdown_full(rows: list[dict], *, load: str | None = None, links: dict[str, str] | None = None) -> str:
    """The summary followed by one table row per measured case."""
    ok = _ok(rows)
    algo = any(r.get("conv_algo") for r in ok)
    err = any(r.get("max_rel_err") for r in ok)
    fast = _has_fastest(ok)
    body = []
    for r in ok:
        sp = _f(r["speedup_vs_dense"])
        p20, p80 = _f(r.get("p20")), _f(r.get("p80"))
        spread = f"{p20:.3f}-{p80:.3f}" if p20 is not None and p80 is not None else ""
        body.append([
            r["op"], r["provider"], r["mode"], r["dims"], r["layout"], _pct(r["sparsity"]),
            f"{float(r['density']):.3f}" if _f(r.get("density")) is not None else "", r["dtype"],
            f"{float(r['p50']):.3f}", spread, r["gflops"], f"{sp:.2f}x" if sp else "",
            *([_vs_fastest(r)] if fast else []), *([r.get("conv_algo", "")] if algo else []), *([r.get("max_rel_err", "")] if err else []),
            r.get("goal_met", ""),
        ])  # fmt: skip
    head = ["op", "provider", "mode", "dims", "layout", "sparsity", "density", "dtype", "p50 ms", "p20-p80 ms",
            "GFLOP/s", "speedup", *(["vs fastest dense"] if fast else []), *(["conv algo (fwd/dx/dw)"] if algo else []), *(["max rel err"] if err else []),
            "goal"]  # fmt: skip
    return (
        "# sparsekern benchmark results\n\n"
        + markdown_summary(rows, load=load, links=links)
        + "\n#### Every case\n\n"
        + "\n".join(_table(head, body))
        + "\n"
    )


def plot(rows: list[dict], path: str | Path) -> Path | None:
    """Speedup against sparsity, one line per (provider, layout), one panel per op; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in _ok(rows) if r["provider"] != "dense" and _f(r["speedup_vs_dense"]) and r["op"] != "rebuild"]
    panels = []
    for op in (*_SPARSE_OPS, "train_step", "train_epoch"):
        rs = [r for r in ok if r["op"] == op]
        if not rs:
            continue
        modes = {r["mode"] for r in rs}
        mode = next(m for m in ("fwd+bwd", "train", "fwd", "bwd") if m in modes)
        panels.append((op, mode, [r for r in rs if r["mode"] == mode]))
    if not panels:
        return None
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.8 * nrow), squeeze=False)
    colors = {
        "cpp": "tab:blue",
        "reference": "tab:gray",
        "torch.sparse": "tab:orange",
        "triton": "tab:green",
        "cuda": "tab:red",
    }
    styles = {"unstructured": ("o", "-"), "block16": ("s", "--"), "block32": ("^", "-."), "block64": ("D", ":")}
    for ax, (op, mode, rs) in zip(axes.flat, panels):
        # one line per provider/layout (and per model for the end-to-end panels)
        lines: dict[tuple[str, str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in rs:
            model = r["shape"] if op in ("train_step", "train_epoch") else ""
            lines[(r["provider"], r["layout"], model)][float(r["sparsity"])].append(float(r["speedup_vs_dense"]))
        all_s = sorted({s for d in lines.values() for s in d})
        models = sorted({k[2] for k in lines})
        for (prov, layout, model), pts in sorted(lines.items()):
            xs = sorted(pts)
            marker, ls = styles.get(layout, ("x", "-"))
            if model and len(models) > 1:
                ls = ("-", "--", "-.", ":")[models.index(model) % 4]
            label = f"{prov} / {layout}" + (f" / {model}" if model else "")
            ax.plot([x * 100 for x in xs], [_geomean(pts[x]) for x in xs], marker=marker, ls=ls,
                    color=colors.get(prov), label=label)  # fmt: skip
        if all_s:
            lim = [s for s in all_s if s < 1]
            ax.plot(
                [s * 100 for s in lim], [1 / (1 - s) for s in lim], ls=":", color="grey", label="FLOP limit 1/(1-s)"
            )
        ax.axhline(1.0, color="black", lw=0.8, label="dense")
        ax.set_yscale("log")
        ax.set_title(f"{op} ({mode})")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("speedup vs dense (geo. mean)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    r0 = rows[0]
    fig.suptitle(
        f"sparsekern speedup vs dense PyTorch - {r0.get('cpu_model', '')}, {r0.get('threads', '')} thread(s)",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def update_readme(readme: str | Path, section: str) -> Path:
    """Put ``section`` between the bench markers of ``readme`` (markers appended if missing)."""
    readme = Path(readme)
    text = readme.read_text() if readme.exists() else ""
    block = f"{README_START}\n{section.rstrip()}\n{README_END}"
    if README_START in text and README_END in text and text.index(README_START) < text.index(README_END):
        head, rest = text.split(README_START, 1)
        _, tail = rest.split(README_END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    readme.write_text(text)
    return readme


def write_reports(rows: list[dict], csv_path: str | Path, *, with_plot: bool = True) -> dict:
    """Write ``<stem>.md`` (every case) and ``<stem>.png`` (unless ``with_plot`` is false, or
    without matplotlib) beside ``csv_path``; returns their paths (``png`` None when not drawn)."""
    csv_path = Path(csv_path)
    md_path, png_path = csv_path.with_suffix(".md"), csv_path.with_suffix(".png")
    png = plot(rows, png_path) if with_plot else None
    links = {"all cases (Markdown)": md_path.name, "CSV": csv_path.name}
    if png or png_path.exists():
        links["plot"] = png_path.name
    md_path.write_text(markdown_full(rows, links=links))
    return {"csv": csv_path, "md": md_path, "png": png}


def _section_of(text: str) -> str:
    if README_START in text and README_END in text and text.index(README_START) < text.index(README_END):
        return text.split(README_START, 1)[1].split(README_END, 1)[0]
    return ""


def readme_csvs(readme: str | Path) -> list[Path]:
    """The results CSVs the README's benchmark section is made from, in order (absolute paths)."""
    readme = Path(readme)
    if not readme.exists():
        return []
    base = readme.resolve().parent
    return [(base / p).resolve() for p in _CSV_MARK.findall(_section_of(readme.read_text()))]


def _title(rows: list[dict], csv_path: Path) -> str:
    m = re.search(r"--preset (\S+)", rows[0].get("command", "")) if rows else None
    return f"`--preset {m.group(1)}` ({csv_path.name})" if m else csv_path.name


def write_readme(readme: str | Path, csvs: list[str | Path]) -> Path:
    """Make the README's benchmark section from the CSVs it already names plus ``csvs``.

    Each CSV gets one part (its summary, links to its Markdown and plot); a CSV the section
    already names keeps its place and is read again, new ones are appended.

    Raises:
        FileNotFoundError: the section names a CSV that does not exist.
    """
    readme = Path(readme)
    base = readme.resolve().parent
    paths = readme_csvs(readme)
    for c in csvs:
        c = Path(c).resolve()
        if c not in paths:
            paths.append(c)
    out = [
        "## Benchmarks",
        "",
        "Generated by `python -m sparsekern.bench` from the CSVs named below, one part each; do not edit by "
        "hand. A run with `--readme README.md` adds or replaces its own part; "
        "`--from-csv <csv> ... --readme README.md` makes parts again from their CSVs.",
    ]
    for c in paths:
        rel = os.path.relpath(c, base)
        if not c.exists():
            raise FileNotFoundError(f"{readme}: the benchmark section names {rel}, which does not exist")
        rows = read_csv(c)
        links = {"all cases (Markdown)": os.path.relpath(c.with_suffix(".md"), base), "CSV": rel}
        png = c.with_suffix(".png")
        img = [f"![speedup against sparsity]({os.path.relpath(png, base)})", ""] if png.exists() else []
        out += ["", f"<!-- bench:csv {rel} -->", f"### {_title(rows, c)}", "", *img,
                markdown_summary(rows, links=links).rstrip()]  # fmt: skip
    return update_readme(readme, "\n".join(out))
