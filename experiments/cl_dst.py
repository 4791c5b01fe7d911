"""DST continual-learning grid: init x growth x sparsity x number of tasks, mean ± std over seeds.

    .venv/bin/python experiments/cl_dst.py --select-seeds 1            # the recorded grid (5 seeds)
    .venv/bin/python experiments/cl_dst.py --seeds 2 --growths random gradient   # a reduced one
    .venv/bin/python experiments/cl_dst.py --select-seeds 1 --table-only         # tables from the CSV

Steps:
1. Model selection on a validation split (``validation`` = 10 % of each class's training data;
   the test split is never looked at): learning rate x topology-update interval for DST
   (ERK, random growth, the first sparsity), then the adaptive_capacity threshold.
2. The grid on the test split with the selected values, plus a dense multi-head fine-tune of the
   same network per seed (the reference for wall-clock and FLOPs).
3. ``<out>.csv`` (every run: its configuration and the numbers the tables use, the curated
   record), ``<out>.md`` (the table, the comparisons, the command) and ``<out>.png`` (Task-IL ACC
   per growth strategy); ``<out>`` is ``experiments/results/cl_dst_grid``.

Every finished run is appended to the resume journal ``--runs`` (under ``experiments/runs/``, not
in git); running the command again skips those, so an interrupted grid resumes.  Without the
journal the runs are read back from ``<out>.csv``, so ``--table-only`` remakes the tables from
the committed CSV.  Mean ± std and the significance of differences follow
:mod:`sparsekern_cl.table` (paired by seed, Holm-corrected over the table's comparisons).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys

import sparsekern_cl
from sparsekern_cl.methods.dst import FIXED_GROWTH, GROWTH
from sparsekern_cl.table import RULE, compare_paired, mean_std, read_runs, table_command, write_runs

BASE = {
    "method": "dst",
    "dataset": "mnist",
    "backbone": "mlp",
    "mlp_hidden": [100, 100],
    "batch_size": 32,
    "optimizer": "adam",
    "dst_drop_rate": 0.5,
    "dst_drop_rate_final": 0.005,
    "threads": 1,
    "progress": False,
    "plots": False,
}


def _key(cfg: dict) -> str:
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


# the curated CSV: what the tables and the plot read of each run
COLUMNS = ["key", "config", "eval_split", "acc", "bwt", "fwt", "train_flops", "dense_train_flops", "wall_clock_s",
           "usage_per_layer", "command"]  # fmt: skip


class Runs:
    """Runs ``sparsekern_cl.run`` once per configuration, caching the summary of each in a JSONL file.

    Without the journal, earlier runs come from the curated CSV ``curated`` (if it exists);
    ``read_only`` refuses to run anything new.
    """

    def __init__(self, path: str, curated: str | None = None, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self.done: dict[str, dict] = {}
        if os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    rec = json.loads(line)
                    self.done[rec["key"]] = rec
        elif curated and os.path.isfile(curated):
            self.done = {_key(r["config"]): r for r in read_runs(curated)}

    def get(self, cfg: dict) -> dict:
        k = _key(cfg)
        if k in self.done:
            return self.done[k]
        if self.read_only:
            raise SystemExit(f"--table-only: no recorded run for {cfg}")
        res = sparsekern_cl.run(cfg)
        rep = res.get("method_report", {}).get("dst", {})
        rec = {
            "key": k,
            "config": cfg,
            "acc_matrix": res["acc_matrix"]["task_il"],
            "acc": res["avg_acc"]["task_il"],
            "bwt": res["bwt"]["task_il"],
            "fwt": res["fwt"]["task_il"],
            "train_flops": res["train_flops"],
            "dense_train_flops": res["dense_train_flops"],
            "flops_breakdown": res["flops_breakdown"]["counted"],
            "wall_clock_s": res["wall_clock_s"],
            "usage": rep.get("usage"),
            "usage_per_layer": rep.get("usage_per_layer"),
            "growth_per_task": [t["growth"] for t in rep.get("tasks", [])],
            "densities": rep.get("densities"),
            "eval_split": res["scenario"]["eval_split"],
        }
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.done[k] = rec
        print(
            f"  {cfg.get('sparse_distribution')}/{cfg.get('dst_growth')}/{cfg['sparsity']}/T={cfg['n_tasks']}"
            f"/seed {cfg['seed']}: ACC {rec['acc']:.2f} BWT {rec['bwt']:.2f} {rec['wall_clock_s']:.1f}s",
            file=sys.stderr,
            flush=True,
        )
        return rec


def _seeds(recs: list[dict], field: str = "acc") -> dict[int, float]:
    return {r["config"]["seed"]: r[field] for r in recs}


def select(runs: Runs, args, common: dict) -> dict:
    """Hyperparameters chosen on the validation split (mean validation Task-IL ACC over the selection seeds)."""
    val = {**common, "validation": 0.1, "split_seed": 0, "sparsity": args.sparsities[0], "n_tasks": args.n_tasks[0]}
    seeds = range(args.select_seeds)
    scores = []
    for lr in args.lrs:
        for every in args.update_every:
            accs = [
                runs.get(
                    {
                        **val,
                        "sparse_distribution": "erk",
                        "dst_growth": "random",
                        "lr": lr,
                        "dst_update_every": every,
                        "seed": s,
                    }
                )["acc"]
                for s in seeds
            ]
            scores.append({"lr": lr, "dst_update_every": every, "val_acc": statistics.fmean(accs)})
    best = max(scores, key=lambda r: r["val_acc"])
    chosen = {"lr": best["lr"], "dst_update_every": best["dst_update_every"]}
    tau_scores = []
    for tau in args.thresholds:
        accs = [
            runs.get(
                {
                    **val,
                    **chosen,
                    "sparse_distribution": init,
                    "dst_growth": "adaptive_capacity",
                    "dst_capacity_threshold": tau,
                    "seed": s,
                }
            )["acc"]
            for s in seeds
            for init in args.inits
        ]
        tau_scores.append({"dst_capacity_threshold": tau, "val_acc": statistics.fmean(accs)})
    chosen["dst_capacity_threshold"] = max(tau_scores, key=lambda r: r["val_acc"])["dst_capacity_threshold"]
    return {
        "chosen": chosen,
        "lr_interval": scores,
        "threshold": tau_scores,
        "setting": {"validation": 0.1, "seeds": list(seeds), "sparsity": val["sparsity"]},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.95])
    p.add_argument("--inits", nargs="+", default=["erk", "uniform"], choices=["erk", "uniform"])
    p.add_argument("--growths", nargs="+", default=list(GROWTH), choices=list(GROWTH))
    p.add_argument("--n-tasks", type=int, nargs="+", default=[5])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--update-every", type=int, nargs="+", default=[5, 15])
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--select-seeds", type=int, default=2)
    p.add_argument("--out", default="experiments/results/cl_dst_grid", help="prefix of the curated CSV, table, plot")
    p.add_argument("--runs", default="experiments/runs/cl_dst_grid.runs.jsonl", help="the resume journal")
    p.add_argument("--table-only", action="store_true", help="run nothing: tables from the recorded runs")
    args = p.parse_args(argv)
    command = table_command("experiments/cl_dst.py", argv if argv is not None else sys.argv[1:])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    runs = Runs(args.runs, args.out + ".csv", read_only=args.table_only)
    common = {**BASE, "epochs": args.epochs}

    print("model selection on the validation split", file=sys.stderr)
    sel = select(runs, args, common)
    chosen = sel["chosen"]
    print(f"chosen: {chosen}", file=sys.stderr)

    groups: dict[tuple, list[dict]] = {}
    dense: dict[int, list[dict]] = {}
    for T in args.n_tasks:
        for s in range(args.seeds):
            dense.setdefault(T, []).append(
                runs.get(
                    {
                        **common,
                        "method": "finetune",
                        "head": "multi",
                        "sparsity": 0.0,
                        "lr": chosen["lr"],
                        "n_tasks": T,
                        "seed": s,
                    }
                )
            )
        for sp in args.sparsities:
            for init in args.inits:
                for g in args.growths:
                    cfg = {
                        **common,
                        **chosen,
                        "n_tasks": T,
                        "sparsity": sp,
                        "sparse_distribution": init,
                        "dst_growth": g,
                    }
                    groups[(T, sp, init, g)] = [runs.get({**cfg, "seed": s}) for s in range(args.seeds)]

    rows = []
    for (T, sp, init, g), recs in groups.items():
        d = {r["config"]["seed"]: r for r in dense[T]}
        ratio = [d[r["config"]["seed"]]["wall_clock_s"] / r["wall_clock_s"] for r in recs]
        flops = [r["train_flops"] / d[r["config"]["seed"]]["train_flops"] for r in recs]
        layers = sorted(recs[0]["usage_per_layer"])
        rows.append(
            {
                "n_tasks": T,
                "sparsity": sp,
                "init": init,
                "growth": g,
                "seeds": len(recs),
                "acc": mean_std([r["acc"] for r in recs]),
                "bwt": mean_std([r["bwt"] for r in recs]),
                # FWT is not defined for multi-head runs (None since issue 17); older records hold a number
                "fwt": mean_std(f) if (f := [r["fwt"] for r in recs if r["fwt"] is not None]) else None,
                "usage_per_layer": {n: statistics.fmean(r["usage_per_layer"][n] for r in recs) for n in layers},
                "flops_vs_dense": statistics.fmean(flops),
                "wall_clock_s": statistics.fmean(r["wall_clock_s"] for r in recs),
                "wall_clock_ratio_dense_over_dst": mean_std(ratio),
            }
        )
    dense_rows = {
        T: {
            "acc": mean_std([r["acc"] for r in v]),
            "bwt": mean_std([r["bwt"] for r in v]),
            "wall_clock_s": statistics.fmean(r["wall_clock_s"] for r in v),
        }
        for T, v in dense.items()
    }

    # comparisons: ERK vs uniform per growth; adaptive vs each fixed strategy; one family
    what, pairs = [], []
    for T in args.n_tasks:
        for sp in args.sparsities:
            for g in args.growths:
                if "erk" in args.inits and "uniform" in args.inits:
                    what.append((T, sp, f"{g}: erk - uniform"))
                    pairs.append(
                        ("erk", "uniform", _seeds(groups[(T, sp, "erk", g)]), _seeds(groups[(T, sp, "uniform", g)]))
                    )
            for init in args.inits:
                fixed = [g for g in args.growths if g in FIXED_GROWTH]
                for ad in [g for g in args.growths if g not in FIXED_GROWTH]:
                    for g in fixed:
                        what.append((T, sp, f"{init}: {ad} - {g}"))
                        pairs.append((ad, g, _seeds(groups[(T, sp, init, ad)]), _seeds(groups[(T, sp, init, g)])))
    comps = [{"n_tasks": T, "sparsity": sp, "what": w, **c} for (T, sp, w), c in zip(what, compare_paired(pairs))]
    out = {
        "command": command,
        "selection": sel,
        "rows": rows,
        "dense": dense_rows,
        "comparisons": comps,
        "base_config": common,
    }
    write_runs(args.out + ".csv", [{**r, "command": r.get("command") or command} for r in runs.done.values()], COLUMNS)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(out))
    plot(out, args.out + ".png")
    print(markdown(out))
    return 0


def _pm(ms) -> str:
    return f"{ms[0]:.2f} ± {ms[1]:.2f}"


def markdown(out: dict) -> str:
    c = out["selection"]["chosen"]
    b = out["base_config"]
    lines = [
        "# DST continual learning: init × growth × sparsity (Task-IL)",
        "",
        f"Command: `{out['command']}`",
        "",
        f"Data: embedded MNIST subset (400 train / 100 test images per class), tasks of 2 classes; MLP "
        f"{b['mlp_hidden']} (head dense, one slice per task), {b['epochs']} epochs per task, batch {b['batch_size']}, "
        f"Adam lr {c['lr']}, topology update every {c['dst_update_every']} steps, drop rate "
        f"{b['dst_drop_rate']} → {b['dst_drop_rate_final']} (cosine), adaptive_capacity threshold "
        f"{c['dst_capacity_threshold']}; 1 thread.  Hyperparameters chosen on a 10 % validation split of the "
        f"training data (seeds {out['selection']['setting']['seeds']}), never on the test split.",
        "",
        "ACC = mean Task-IL accuracy (%) over all tasks after the last one; BWT = backward transfer; mean ± std "
        "over seeds.  Usage = fraction of a layer's weights used by some task at the end.  FLOPs and wall-clock "
        "are against a dense multi-head fine-tune of the same network (same seeds, same run settings); "
        "wall-clock ratio = dense time / DST time (> 1: DST faster).",
        "",
        "| tasks | sparsity | init | growth | seeds | ACC | BWT | usage fc1 / fc2 | FLOPs / dense | wall-clock dense/DST |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        u = " / ".join(f"{v:.2f}" for v in r["usage_per_layer"].values())
        lines.append(
            f"| {r['n_tasks']} | {r['sparsity']:.0%} | {r['init']} | {r['growth']} | {r['seeds']} | "
            f"{_pm(r['acc'])} | {_pm(r['bwt'])} | {u} | {r['flops_vs_dense']:.3f} | "
            f"{_pm(r['wall_clock_ratio_dense_over_dst'])} |"
        )
    for T, d in out["dense"].items():
        lines.append(
            f"| {T} | dense | – | multi-head fine-tune | – | {_pm(d['acc'])} | {_pm(d['bwt'])} | 1 / 1 | "
            f"1 | 1 ({d['wall_clock_s']:.2f} s) |"
        )
    lines += [
        "",
        f"## Comparisons (ACC difference, {len(out['comparisons'])} comparisons)",
        "",
        RULE,
        "",
        "| tasks | sparsity | comparison | paired seeds | diff | std of differences | p (Holm) | significant |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cmp in out["comparisons"]:
        p = "–" if cmp["p_holm"] is None else f"{cmp['p_holm']:.2g}"
        lines.append(
            f"| {cmp['n_tasks']} | {cmp['sparsity']:.0%} | {cmp['what']} | {cmp['n']} | {cmp['diff']:+.2f} | "
            f"{cmp['sd']:.2f} | {p} | {'**yes**' if cmp['significant'] else 'no'} |"
        )
    lines += ["", "## Model selection (validation split)", "", "| lr | update every | val ACC |", "|---|---|---|"]
    for r in out["selection"]["lr_interval"]:
        lines.append(f"| {r['lr']} | {r['dst_update_every']} | {r['val_acc']:.2f} |")
    lines += ["", "| adaptive_capacity threshold | val ACC |", "|---|---|"]
    for r in out["selection"]["threshold"]:
        lines.append(f"| {r['dst_capacity_threshold']} | {r['val_acc']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(out: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = sorted({(r["n_tasks"], r["sparsity"]) for r in out["rows"]})
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, (T, sp) in zip(axes[0], keys):
        rows = [r for r in out["rows"] if r["n_tasks"] == T and r["sparsity"] == sp]
        growths = list(dict.fromkeys(r["growth"] for r in rows))
        inits = list(dict.fromkeys(r["init"] for r in rows))
        w = 0.8 / len(inits)
        for i, init in enumerate(inits):
            rr = {r["growth"]: r for r in rows if r["init"] == init}
            xs = [j + i * w for j in range(len(growths))]
            ax.bar(
                xs,
                [rr[g]["acc"][0] for g in growths],
                w,
                yerr=[rr[g]["acc"][1] for g in growths],
                label=init,
                capsize=2,
            )
        ax.set_xticks([j + w * (len(inits) - 1) / 2 for j in range(len(growths))])
        ax.set_xticklabels(growths, rotation=30, ha="right", fontsize=8)
        lo = min(r["acc"][0] - r["acc"][1] for r in rows)
        ax.set_ylim(max(0, lo - 2), 100)
        ax.set_title(f"{T} tasks, {sp:.0%} sparse")
        ax.set_ylabel("Task-IL ACC (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
