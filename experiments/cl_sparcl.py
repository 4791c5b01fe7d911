"""SparCL against dense DER++ / ER on the embedded MNIST subset: accuracy, training FLOPs, wall-clock, ablation.

Runs the grid through ``sparsekern_cl.run``; every finished run goes to the resume journal
``experiments/runs/cl_sparcl_<preset>_runs.json`` (not in git; an interrupted grid resumes where it
stopped), and the curated results to ``experiments/results/cl_sparcl_<preset>.csv`` (one row per
run: the numbers the tables use) and ``cl_sparcl_<preset>.md``.  Without the journal the runs are
read back from the CSV, so ``--table-only`` remakes the tables from the committed CSV.

    python experiments/cl_sparcl.py                      # the full grid, paper preset
    python experiments/cl_sparcl.py --preset official    # the official-code preset
    python experiments/cl_sparcl.py --seeds 0 1 --buffers 500 --sparsities 0.75 --ablation-buffers 500
    python experiments/cl_sparcl.py --table-only         # the paper preset's tables from its CSV

Grid: buffers x sparsities x seeds of dense DER++, SparCL-DER++, dense ER, SparCL-ER, plus the
ablation rows (TDM, TDM+DDR, TDM+DGM; "all" is the SparCL-DER++ run) at ``--ablation-buffers``.
Every run uses one torch thread; ``--workers`` runs that many at once (timings are then taken
under the same load for dense and sparse runs, and the wall-clock ratio pairs runs of one seed).
Class-IL and Task-IL accuracies come from the same runs (the final average accuracy of each).
Mean ± std and the significance of differences follow :mod:`sparsekern_cl.table`.
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

from sparsekern_cl.table import RULE, compare_paired, fmt_mean_std, read_runs, table_command, write_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "experiments", "results")
RUNS = os.path.join(ROOT, "experiments", "runs")
# the curated CSV: one row per run
COLUMNS = [
    "key",
    "label",
    "method",
    "sparsity",
    "buffer",
    "seed",
    "extra",
    "class_il",
    "task_il",
    "train_flops",
    "dense_train_flops",
    "wall_clock_s",
    "fc1_grad_density",
    "command",
    "platform",
    "torch",
    "commit",
]

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
                jobs.append(
                    {"label": "SparCL-DER++", "method": "sparcl_derpp", "sparsity": sp, "buffer": buf, "seed": seed}
                )
                jobs.append({"label": "SparCL-ER", "method": "sparcl_er", "sparsity": sp, "buffer": buf, "seed": seed})
                if buf in args.ablation_buffers:
                    for name, kw in ABLATION.items():
                        jobs.append(
                            {
                                "label": name,
                                "method": "sparcl_derpp",
                                "sparsity": sp,
                                "buffer": buf,
                                "seed": seed,
                                "extra": kw,
                            }
                        )
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

    cfg = {
        "config": config_path,
        "method": job["method"],
        "sparsity": job["sparsity"],
        "buffer_size": job["buffer"],
        "seed": job["seed"],
        "threads": 1,
        "progress": False,
        "plots": False,
        **job.get("extra", {}),
    }
    if epochs:
        cfg["epochs"] = epochs
    r = sparsekern_cl.run(cfg)
    return {
        **job,
        "class_il": r["avg_acc"]["class_il"],
        "task_il": r["avg_acc"]["task_il"],
        "train_flops": r["train_flops"],
        "dense_train_flops": r["dense_train_flops"],
        "wall_clock_s": r["wall_clock_s"],
        "fc1_grad_density": r["layers"].get("fc1", {"grad": 1.0})["grad"],
    }


def _flat(rec: dict) -> dict:
    """A journal record of the former layout (nested accuracies and layers) as a curated row."""
    if "avg_acc" not in rec:
        return rec
    out = {k: rec[k] for k in ("key", "label", "method", "sparsity", "buffer", "seed", "train_flops",
                               "dense_train_flops", "wall_clock_s") if k in rec}  # fmt: skip
    out.update(extra=rec.get("extra"), class_il=rec["avg_acc"]["class_il"], task_il=rec["avg_acc"]["task_il"],
               fc1_grad_density=rec["layers"].get("fc1", {"grad": 1.0})["grad"])  # fmt: skip
    return out


def _against(rows: dict, base: dict) -> tuple[list, list, list, list]:
    """Seeds both ran, and on them this config's Class-IL, Task-IL and FLOPs relative to ``base``."""
    seeds = sorted(set(rows) & set(base))
    return (seeds, [rows[s]["class_il"] for s in seeds], [rows[s]["task_il"] for s in seeds],
            [rows[s]["train_flops"] / base[s]["train_flops"] for s in seeds])  # fmt: skip


def _table(records: dict, args, command: str, env: dict) -> str:
    recs = list(records.values())

    def pick(label, sp, buf):
        return {
            r["seed"]: r
            for r in recs
            if r["label"] == label and r["buffer"] == buf and (r["sparsity"] == sp or label in ("DER++", "ER"))
        }

    lines = [
        f"# SparCL on the embedded MNIST subset ({args.preset} preset)",
        "",
        f"Command: `{command}`",
        "",
        f"Config: `{args.config}` (epochs per task: {args.epochs or 'from the config'}); "
        f"seeds {args.seeds}; one torch thread per run, {args.workers} runs at once.",
        f"Machine: {env['platform']}, torch {env['torch']}, commit {env['commit']}.",
        "",
        "Accuracies are the final average accuracy (%) over the 5 tasks, mean ± std over seeds. "
        "FLOPs: training FLOPs counted from the densities actually used (weight mask in forward and "
        "input gradient, gradient mask in the weight gradient, removed examples, extra passes), "
        "relative to dense DER++ of the same buffer. Wall-clock ratio: dense DER++ training time / "
        "this run's, paired by seed (same process pool, same load). Δ Class-IL: difference to dense "
        "DER++ (this − dense), mean ± std of the per-seed differences, and its p-value; the comparisons "
        f"with DER++ of one section are one family. {RULE} Significant differences are **bold**.",
        "",
    ]

    def sections(buffers):  # (buffer, sparsity, dense DER++ runs by seed) that have a baseline
        for buf in buffers:
            for sp in args.sparsities:
                if pick("DER++", sp, buf):
                    yield buf, sp, pick("DER++", sp, buf)

    def family(buf, sp, base):  # one family per section: every method present against dense DER++
        present = [(label, pick(label, sp, buf)) for label in ("DER++", "SparCL-DER++", "ER", "SparCL-ER", *ABLATION)]
        present = [(label, rows) for label, rows in present if set(rows) & set(base)]
        tests = compare_paired([(label, "DER++", {s: r["class_il"] for s, r in rows.items() if s in base},
                                 {s: r["class_il"] for s, r in base.items()})
                                for label, rows in present if label != "DER++"])  # fmt: skip
        return present, dict(zip([label for label, _ in present if label != "DER++"], tests))

    def delta(label, rows, base, tests):  # (Δ Class-IL text, p text), significant ones bold
        if label == "DER++":
            return "—", "—"
        c = tests[label]
        dtxt = fmt_mean_std([rows[s]["class_il"] - base[s]["class_il"] for s in sorted(set(rows) & set(base))])
        dtxt = dtxt if dtxt.startswith("-") else "+" + dtxt
        ptxt = "–" if c["p_holm"] is None else f"{c['p_holm']:.2g}"
        return (f"**{dtxt}**" if c["significant"] else dtxt), ptxt

    for buf, sp, base in sections(args.buffers):
        lines += [
            f"## buffer {buf}, sparsity {sp}",
            "",
            "| method | Class-IL | Task-IL | Δ Class-IL vs DER++ | p (Holm) | train FLOPs (×dense DER++) "
            "| wall-clock ratio (DER++ / this) | n |",
            "|---|---|---|---|---|---|---|---|",
        ]
        present, tests = family(buf, sp, base)
        for label, rows in present:
            seeds, ci, ti, fl = _against(rows, base)
            wc = [base[s]["wall_clock_s"] / rows[s]["wall_clock_s"] for s in seeds]
            dtxt, ptxt = delta(label, rows, base, tests)
            name = label if label in ("DER++", "ER", "SparCL-DER++", "SparCL-ER") else f"SparCL-DER++ ({label})"
            lines.append(
                f"| {name} | {fmt_mean_std(ci)} | {fmt_mean_std(ti)} | {dtxt} | {ptxt} | "
                f"{fmt_mean_std(fl, 3)} | {fmt_mean_std(wc)} | {len(seeds)} |"
            )
        lines.append("")
    # ablation in the paper's form
    for buf, sp, base in sections(args.ablation_buffers):
        lines += [
            f"## Ablation (paper's form), SparCL-DER++, buffer {buf}, sparsity {sp}",
            "",
            "| TDM | DDR | DGM | Class-IL | Task-IL | Δ Class-IL vs DER++ | p (Holm) | train FLOPs (×dense) "
            "| weight-grad density (fc1) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        _, tests = family(buf, sp, base)  # the section's family, as in the table above
        for flags, label in (
            ("✗ ✗ ✗", "DER++"),
            ("✓ ✗ ✗", "TDM"),
            ("✓ ✓ ✗", "TDM+DDR"),
            ("✓ ✗ ✓", "TDM+DGM"),
            ("✓ ✓ ✓", "SparCL-DER++"),
        ):
            rows = pick(label, sp, buf)
            seeds, ci, ti, fl = _against(rows, base)
            if not seeds:
                continue
            gd = statistics.fmean(rows[s]["fc1_grad_density"] for s in seeds)
            dtxt, ptxt = delta(label, rows, base, tests)
            lines.append(
                f"| {' | '.join(flags.split())} | {fmt_mean_std(ci)} | {fmt_mean_std(ti)} | {dtxt} | {ptxt} | "
                f"{fmt_mean_std(fl, 3)} | {gd:.3f} |"
            )
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
    p.add_argument("--table-only", action="store_true", help="rewrite the table from the recorded runs")
    p.add_argument("--out", default=OUT, help="directory of the curated CSV and table")
    p.add_argument("--runs", default=RUNS, help="directory of the resume journal")
    args = p.parse_args(argv)
    args.config = os.path.join("configs", f"sparcl_{args.preset}_mnist.yaml")
    out_dir, runs_dir = os.path.abspath(args.out), os.path.abspath(args.runs)
    os.chdir(ROOT)
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(runs_dir, exist_ok=True)
    stem = f"cl_sparcl_{args.preset}{args.tag}"
    runs_path = os.path.join(runs_dir, stem + "_runs.json")
    csv_path = os.path.join(out_dir, stem + ".csv")
    command = table_command("experiments/cl_sparcl.py", argv if argv is not None else sys.argv[1:])
    records, env = {}, None
    if os.path.isfile(runs_path):
        with open(runs_path) as f:
            saved = json.load(f)
        records = {k: _flat(r) for k, r in saved["runs"].items()}
        env, command = saved["environment"], saved.get("command", command)
    elif os.path.isfile(csv_path):
        rows = read_runs(csv_path)
        records = {r["key"]: r for r in rows}
        if rows:
            env, command = {k: rows[0][k] for k in ("platform", "torch", "commit")}, rows[0]["command"]
    jobs = [] if args.table_only else [j for j in _jobs(args) if j["key"] not in records]
    print(f"{len(jobs)} runs to do ({len(records)} already done)", flush=True)
    if env is None or jobs:
        import torch

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        env = {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "commit": commit,
            "cpu_count": os.cpu_count(),
        }
        command = table_command("experiments/cl_sparcl.py", argv if argv is not None else sys.argv[1:])

    def save():
        with open(runs_path + ".tmp", "w") as f:
            json.dump({"command": command, "environment": env, "runs": records}, f, indent=1)
        os.replace(runs_path + ".tmp", runs_path)

    t0 = time.time()
    if jobs:
        with mp.get_context("spawn").Pool(args.workers, initializer=_init_worker) as pool:
            for i, rec in enumerate(pool.imap_unordered(_run, [(j, args.config, args.epochs) for j in jobs])):
                records[rec["key"]] = rec
                save()
                print(f"[{i + 1}/{len(jobs)} {time.time() - t0:.0f}s] {rec['key']}: class-IL {rec['class_il']:.2f} "
                      f"task-IL {rec['task_il']:.2f} flops {rec['train_flops'] / rec['dense_train_flops']:.3f} "
                      f"time {rec['wall_clock_s']:.1f}s", flush=True)  # fmt: skip
    meta = {"command": command, **{k: env[k] for k in ("platform", "torch", "commit")}}
    write_runs(csv_path, [{**r, **meta} for r in records.values()], COLUMNS)
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(_table(records, args, command, env))
    print(f"wrote {csv_path} and {stem}.md", flush=True)


if __name__ == "__main__":
    main()
