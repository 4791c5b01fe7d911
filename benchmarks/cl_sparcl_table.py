"""SparCL against dense DER++ / ER on the embedded MNIST subset: accuracy, training FLOPs, wall-clock, ablation.

Runs the grid through ``sparsekern_cl.run`` and writes ``benchmarks/results/cl_sparcl_<preset>_runs.json``
(one record per run; an interrupted grid resumes where it stopped) and ``cl_sparcl_<preset>_table.md``.

    python benchmarks/cl_sparcl_table.py                      # the full grid, paper preset
    python benchmarks/cl_sparcl_table.py --preset official    # the official-code preset
    python benchmarks/cl_sparcl_table.py --seeds 0 1 --buffers 500 --sparsities 0.75 --ablation-buffers 500

Grid: buffers x sparsities x seeds of dense DER++, SparCL-DER++, dense ER, SparCL-ER, plus the
ablation rows (TDM, TDM+DDR, TDM+DGM; "all" is the SparCL-DER++ run) at ``--ablation-buffers``.
Every run uses one torch thread; ``--workers`` runs that many at once (timings are then taken
under the same load for dense and sparse runs, and the wall-clock ratio pairs runs of one seed).
Class-IL and Task-IL accuracies come from the same runs (the final average accuracy of each).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results")

ABLATION = {
    "TDM": {"sparcl_ddr": False, "sparcl_dgm": False},
    "TDM+DDR": {"sparcl_dgm": False},
    "TDM+DGM": {"sparcl_ddr": False},
}


def _jobs(args) -> list[dict]:
    jobs = []
    for buf in args.buffers:
        for seed in args.seeds:
            jobs.append({"label": "DER++", "method": "derpp", "sparsity": 0.0, "buffer": buf, "seed": seed})
            jobs.append({"label": "ER", "method": "er", "sparsity": 0.0, "buffer": buf, "seed": seed})
            for sp in args.sparsities:
                jobs.append({"label": "SparCL-DER++", "method": "sparcl_derpp", "sparsity": sp, "buffer": buf,
                             "seed": seed})
                jobs.append({"label": "SparCL-ER", "method": "sparcl_er", "sparsity": sp, "buffer": buf, "seed": seed})
                if buf in args.ablation_buffers:
                    for name, kw in ABLATION.items():
                        jobs.append({"label": name, "method": "sparcl_derpp", "sparsity": sp, "buffer": buf,
                                     "seed": seed, "extra": kw})
    for j in jobs:
        j["key"] = f"{j['label']}|s{j['sparsity']}|b{j['buffer']}|seed{j['seed']}"
    return jobs


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    import torch._dynamo  # noqa: F401  (the optimizer imports it lazily: keep that out of the first timing)


def _run(job_and_cfg) -> dict:
    job, config_path, epochs = job_and_cfg
    import sparsekern_cl

    cfg = {"config": config_path, "method": job["method"], "sparsity": job["sparsity"],
           "buffer_size": job["buffer"], "seed": job["seed"], "threads": 1, "progress": False, "plots": False,
           **job.get("extra", {})}
    if epochs:
        cfg["epochs"] = epochs
    t0 = time.perf_counter()
    r = sparsekern_cl.run(cfg)
    return {**job, "avg_acc": r["avg_acc"], "bwt": r["bwt"], "train_flops": r["train_flops"],
            "dense_train_flops": r["dense_train_flops"], "flops_breakdown": r["flops_breakdown"],
            "wall_clock_s": r["wall_clock_s"], "layers": r["layers"], "model_sparsity": r["model_sparsity"],
            "memory_footprint": r["memory_footprint"], "method_report": r.get("method_report"),
            "process_s": time.perf_counter() - t0}


def _ms(xs) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _fmt(xs, digits=2) -> str:
    m, s = _ms(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _table(records: dict, args, command: str, env: dict) -> str:
    recs = list(records.values())

    def pick(label, sp, buf):
        return {r["seed"]: r for r in recs if r["label"] == label and r["buffer"] == buf
                and (r["sparsity"] == sp or label in ("DER++", "ER"))}

    lines = [f"# SparCL on the embedded MNIST subset ({args.preset} preset)", "",
             f"Command: `{command}`", "",
             f"Config: `{args.config}` (epochs per task: {args.epochs or 'from the config'}); "
             f"seeds {args.seeds}; one torch thread per run, {args.workers} runs at once.",
             f"Machine: {env['platform']}, torch {env['torch']}, commit {env['commit']}.", "",
             "Accuracies are the final average accuracy (%) over the 5 tasks, mean ± std over seeds. "
             "FLOPs: training FLOPs counted from the densities actually used (weight mask in forward and "
             "input gradient, gradient mask in the weight gradient, removed examples, extra passes), "
             "relative to dense DER++ of the same buffer. Wall-clock ratio: dense DER++ training time / "
             "this run's, paired by seed (same process pool, same load). Δ Class-IL: paired difference to "
             "dense DER++ (this − dense); **bold** when |mean Δ| exceeds the std of the paired differences "
             "(i.e. larger than the seed-to-seed spread), otherwise within noise.", ""]
    for buf in args.buffers:
        for sp in args.sparsities:
            base = pick("DER++", sp, buf)
            if not base:
                continue
            lines += [f"## buffer {buf}, sparsity {sp}", "",
                      "| method | Class-IL | Task-IL | Δ Class-IL vs DER++ | train FLOPs (×dense DER++) "
                      "| wall-clock ratio (DER++ / this) | n |",
                      "|---|---|---|---|---|---|---|"]
            for label in ("DER++", "SparCL-DER++", "ER", "SparCL-ER", *ABLATION):
                rows = pick(label, sp, buf)
                seeds = sorted(set(rows) & set(base))
                if not seeds:
                    continue
                ci = [rows[s]["avg_acc"]["class_il"] for s in seeds]
                ti = [rows[s]["avg_acc"]["task_il"] for s in seeds]
                d = [rows[s]["avg_acc"]["class_il"] - base[s]["avg_acc"]["class_il"] for s in seeds]
                fl = [rows[s]["train_flops"] / base[s]["train_flops"] for s in seeds]
                wc = [base[s]["wall_clock_s"] / rows[s]["wall_clock_s"] for s in seeds]
                dm, ds = _ms(d)
                dtxt = "—" if label == "DER++" else (f"{dm:+.2f} ± {ds:.2f}")
                if label != "DER++" and len(d) > 1 and abs(dm) > ds:
                    dtxt = f"**{dtxt}**"
                name = label if label in ("DER++", "ER", "SparCL-DER++", "SparCL-ER") else f"SparCL-DER++ ({label})"
                lines.append(f"| {name} | {_fmt(ci)} | {_fmt(ti)} | {dtxt} | {_fmt(fl, 3)} | {_fmt(wc)} "
                             f"| {len(seeds)} |")
            lines.append("")
    # ablation in the paper's form
    for buf in args.ablation_buffers:
        for sp in args.sparsities:
            base = pick("DER++", sp, buf)
            if not base:
                continue
            lines += [f"## Ablation (paper's form), SparCL-DER++, buffer {buf}, sparsity {sp}", "",
                      "| TDM | DDR | DGM | Class-IL | Task-IL | train FLOPs (×dense) | weight-grad density (fc1) |",
                      "|---|---|---|---|---|---|---|"]
            for flags, label in (("✗ ✗ ✗", "DER++"), ("✓ ✗ ✗", "TDM"), ("✓ ✓ ✗", "TDM+DDR"),
                                 ("✓ ✗ ✓", "TDM+DGM"), ("✓ ✓ ✓", "SparCL-DER++")):
                rows = pick(label, sp, buf)
                seeds = sorted(set(rows) & set(base))
                if not seeds:
                    continue
                ci = [rows[s]["avg_acc"]["class_il"] for s in seeds]
                ti = [rows[s]["avg_acc"]["task_il"] for s in seeds]
                fl = [rows[s]["train_flops"] / base[s]["train_flops"] for s in seeds]
                gd = statistics.fmean(rows[s]["layers"].get("fc1", {"grad": 1.0})["grad"] for s in seeds)
                lines.append(f"| {' | '.join(flags.split())} | {_fmt(ci)} | {_fmt(ti)} | {_fmt(fl, 3)} | {gd:.3f} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("paper", "official"), default="paper")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--buffers", type=int, nargs="+", default=[200, 500])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.75, 0.9])
    p.add_argument("--ablation-buffers", type=int, nargs="*", default=[200, 500])
    p.add_argument("--epochs", type=int, default=None, help="override the config's epochs per task")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument("--table-only", action="store_true", help="rewrite the table from the stored runs")
    args = p.parse_args(argv)
    args.config = os.path.join("configs", f"sparcl_{args.preset}_mnist.yaml")
    os.chdir(ROOT)
    os.makedirs(OUT, exist_ok=True)
    stem = os.path.join(OUT, f"cl_sparcl_{args.preset}{args.tag}")
    runs_path = stem + "_runs.json"
    records = {}
    if os.path.isfile(runs_path):
        with open(runs_path) as f:
            records = json.load(f)["runs"]
    jobs = [] if args.table_only else [j for j in _jobs(args) if j["key"] not in records]
    print(f"{len(jobs)} runs to do ({len(records)} already done)", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    import torch

    env = {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
           "commit": commit, "cpu_count": os.cpu_count()}
    command = "python benchmarks/cl_sparcl_table.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def save():
        with open(runs_path + ".tmp", "w") as f:
            json.dump({"command": command, "environment": env, "runs": records}, f, indent=1)
        os.replace(runs_path + ".tmp", runs_path)

    t0 = time.time()
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers, initializer=_init_worker) as pool:
        for i, rec in enumerate(pool.imap_unordered(_run, [(j, args.config, args.epochs) for j in jobs])):
            records[rec["key"]] = rec
            save()
            print(f"[{i + 1}/{len(jobs)} {time.time() - t0:.0f}s] {rec['key']}: class-IL "
                  f"{rec['avg_acc']['class_il']:.2f} task-IL {rec['avg_acc']['task_il']:.2f} "
                  f"flops {rec['train_flops'] / rec['dense_train_flops']:.3f} time {rec['wall_clock_s']:.1f}s",
                  flush=True)
    save()
    with open(stem + "_table.md", "w") as f:
        f.write(_table(records, args, command, env))
    print(f"wrote {stem}_table.md", flush=True)


if __name__ == "__main__":
    main()
