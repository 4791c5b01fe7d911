"""DST continual-learning grid: init x growth x sparsity x number of tasks, mean ± std over seeds.

    .venv/bin/python benchmarks/cl_dst_table.py                       # the full grid (5 seeds)
    .venv/bin/python benchmarks/cl_dst_table.py --seeds 2 --growths random gradient   # a reduced one

Steps:
1. Model selection on a validation split (``validation`` = 10 % of each class's training data;
   the test split is never looked at): learning rate x topology-update interval for DST
   (ERK, random growth, the first sparsity), then the adaptive_capacity threshold.
2. The grid on the test split with the selected values, plus a dense multi-head fine-tune of the
   same network per seed (the reference for wall-clock and FLOPs).
3. ``<out>.json`` (every run and the aggregate), ``<out>.md`` (the table, the comparisons, the
   command) and ``<out>.png`` (Task-IL ACC per growth strategy).

Every finished run is appended to ``<out>.runs.jsonl``; running the command again skips those,
so an interrupted grid resumes.  Differences are called beyond the seed-to-seed spread when
``|mean_a - mean_b| > 2 * sqrt(s_a²/n_a + s_b²/n_b)`` (the rule of ``sparsekern_cl.table``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys

import sparsekern_cl
from sparsekern_cl.methods.dst import FIXED_GROWTH, GROWTH

BASE = {
    "method": "dst", "dataset": "mnist", "backbone": "mlp", "mlp_hidden": [100, 100], "batch_size": 32,
    "optimizer": "adam", "dst_drop_rate": 0.5, "dst_drop_rate_final": 0.005, "threads": 1,
    "progress": False, "plots": False,
}


def _key(cfg: dict) -> str:
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


class Runs:
    """Runs ``sparsekern_cl.run`` once per configuration, caching the summary of each in a JSONL file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.done: dict[str, dict] = {}
        if os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    rec = json.loads(line)
                    self.done[rec["key"]] = rec

    def get(self, cfg: dict) -> dict:
        k = _key(cfg)
        if k in self.done:
            return self.done[k]
        res = sparsekern_cl.run(cfg)
        rep = res.get("method_report", {}).get("dst", {})
        rec = {
            "key": k, "config": cfg, "acc_matrix": res["acc_matrix"]["task_il"],
            "acc": res["avg_acc"]["task_il"], "bwt": res["bwt"]["task_il"], "fwt": res["fwt"]["task_il"],
            "train_flops": res["train_flops"], "dense_train_flops": res["dense_train_flops"],
            "flops_breakdown": res["flops_breakdown"]["counted"], "wall_clock_s": res["wall_clock_s"],
            "usage": rep.get("usage"), "usage_per_layer": rep.get("usage_per_layer"),
            "growth_per_task": [t["growth"] for t in rep.get("tasks", [])],
            "densities": rep.get("densities"), "eval_split": res["scenario"]["eval_split"],
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.done[k] = rec
        print(f"  {cfg.get('sparse_distribution')}/{cfg.get('dst_growth')}/{cfg['sparsity']}/T={cfg['n_tasks']}"
              f"/seed {cfg['seed']}: ACC {rec['acc']:.2f} BWT {rec['bwt']:.2f} {rec['wall_clock_s']:.1f}s",
              file=sys.stderr, flush=True)
        return rec


def _stats(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    return statistics.fmean(values), (statistics.stdev(values) if n > 1 else 0.0), n


def _beyond(a: list[float], b: list[float]) -> tuple[float, float, bool]:
    ma, sa, na = _stats(a)
    mb, sb, nb = _stats(b)
    margin = 2 * math.sqrt(sa**2 / na + sb**2 / nb)
    return ma - mb, margin, abs(ma - mb) > margin


def select(runs: Runs, args, common: dict) -> dict:
    """Hyperparameters chosen on the validation split (mean validation Task-IL ACC over the selection seeds)."""
    val = {**common, "validation": 0.1, "split_seed": 0, "sparsity": args.sparsities[0], "n_tasks": args.n_tasks[0]}
    seeds = range(args.select_seeds)
    scores = []
    for lr in args.lrs:
        for every in args.update_every:
            accs = [runs.get({**val, "sparse_distribution": "erk", "dst_growth": "random", "lr": lr,
                              "dst_update_every": every, "seed": s})["acc"] for s in seeds]
            scores.append({"lr": lr, "dst_update_every": every, "val_acc": statistics.fmean(accs)})
    best = max(scores, key=lambda r: r["val_acc"])
    chosen = {"lr": best["lr"], "dst_update_every": best["dst_update_every"]}
    tau_scores = []
    for tau in args.thresholds:
        accs = [runs.get({**val, **chosen, "sparse_distribution": init, "dst_growth": "adaptive_capacity",
                          "dst_capacity_threshold": tau, "seed": s})["acc"]
                for s in seeds for init in args.inits]
        tau_scores.append({"dst_capacity_threshold": tau, "val_acc": statistics.fmean(accs)})
    chosen["dst_capacity_threshold"] = max(tau_scores, key=lambda r: r["val_acc"])["dst_capacity_threshold"]
    return {"chosen": chosen, "lr_interval": scores, "threshold": tau_scores,
            "setting": {"validation": 0.1, "seeds": list(seeds), "sparsity": val["sparsity"]}}


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
    p.add_argument("--out", default="benchmarks/results/cl_dst_grid")
    args = p.parse_args(argv)
    command = "python benchmarks/cl_dst_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    runs = Runs(args.out + ".runs.jsonl")
    common = {**BASE, "epochs": args.epochs}

    print("model selection on the validation split", file=sys.stderr)
    sel = select(runs, args, common)
    chosen = sel["chosen"]
    print(f"chosen: {chosen}", file=sys.stderr)

    groups: dict[tuple, list[dict]] = {}
    dense: dict[int, list[dict]] = {}
    for T in args.n_tasks:
        for s in range(args.seeds):
            dense.setdefault(T, []).append(runs.get({**common, "method": "finetune", "head": "multi", "sparsity": 0.0,
                                                     "lr": chosen["lr"], "n_tasks": T, "seed": s}))
        for sp in args.sparsities:
            for init in args.inits:
                for g in args.growths:
                    cfg = {**common, **chosen, "n_tasks": T, "sparsity": sp, "sparse_distribution": init,
                           "dst_growth": g}
                    groups[(T, sp, init, g)] = [runs.get({**cfg, "seed": s}) for s in range(args.seeds)]

    rows = []
    for (T, sp, init, g), recs in groups.items():
        d = {r["config"]["seed"]: r for r in dense[T]}
        ratio = [d[r["config"]["seed"]]["wall_clock_s"] / r["wall_clock_s"] for r in recs]
        flops = [r["train_flops"] / d[r["config"]["seed"]]["train_flops"] for r in recs]
        layers = sorted(recs[0]["usage_per_layer"])
        rows.append({
            "n_tasks": T, "sparsity": sp, "init": init, "growth": g, "seeds": len(recs),
            "acc": _stats([r["acc"] for r in recs])[:2], "bwt": _stats([r["bwt"] for r in recs])[:2],
            "fwt": _stats([r["fwt"] for r in recs])[:2],
            "usage_per_layer": {n: statistics.fmean(r["usage_per_layer"][n] for r in recs) for n in layers},
            "flops_vs_dense": statistics.fmean(flops), "wall_clock_s": statistics.fmean(r["wall_clock_s"] for r in recs),
            "wall_clock_ratio_dense_over_dst": _stats(ratio)[:2],
            "densities": recs[0]["densities"],
        })
    dense_rows = {T: {"acc": _stats([r["acc"] for r in v])[:2], "bwt": _stats([r["bwt"] for r in v])[:2],
                      "wall_clock_s": statistics.fmean(r["wall_clock_s"] for r in v)} for T, v in dense.items()}

    # comparisons: ERK vs uniform per growth; adaptive vs the best fixed strategy; every pair of growths
    comps = []
    for T in args.n_tasks:
        for sp in args.sparsities:
            for g in args.growths:
                if ("erk" in args.inits and "uniform" in args.inits):
                    a = [r["acc"] for r in groups[(T, sp, "erk", g)]]
                    b = [r["acc"] for r in groups[(T, sp, "uniform", g)]]
                    diff, margin, beyond = _beyond(a, b)
                    comps.append({"n_tasks": T, "sparsity": sp, "what": f"{g}: erk - uniform", "diff": diff,
                                  "margin": margin, "beyond_spread": beyond})
            for init in args.inits:
                fixed = [g for g in args.growths if g in FIXED_GROWTH]
                for ad in [g for g in args.growths if g not in FIXED_GROWTH]:
                    for g in fixed:
                        a = [r["acc"] for r in groups[(T, sp, init, ad)]]
                        b = [r["acc"] for r in groups[(T, sp, init, g)]]
                        diff, margin, beyond = _beyond(a, b)
                        comps.append({"n_tasks": T, "sparsity": sp, "what": f"{init}: {ad} - {g}", "diff": diff,
                                      "margin": margin, "beyond_spread": beyond})
    out = {"command": command, "selection": sel, "rows": rows, "dense": dense_rows, "comparisons": comps,
           "base_config": common, "runs": list(runs.done.values())}
    with open(args.out + ".json", "w") as f:
        json.dump(out, f, indent=1)
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
        "# DST continual learning: init × growth × sparsity (Task-IL)", "",
        f"Command: `{out['command']}`", "",
        f"Data: embedded MNIST subset (400 train / 100 test images per class), tasks of 2 classes; MLP "
        f"{b['mlp_hidden']} (head dense, one slice per task), {b['epochs']} epochs per task, batch {b['batch_size']}, "
        f"Adam lr {c['lr']}, topology update every {c['dst_update_every']} steps, drop rate "
        f"{b['dst_drop_rate']} → {b['dst_drop_rate_final']} (cosine), adaptive_capacity threshold "
        f"{c['dst_capacity_threshold']}; 1 thread.  Hyperparameters chosen on a 10 % validation split of the "
        f"training data (seeds {out['selection']['setting']['seeds']}), never on the test split.", "",
        "ACC = mean Task-IL accuracy (%) over all tasks after the last one; BWT = backward transfer; mean ± std "
        "over seeds.  Usage = fraction of a layer's weights used by some task at the end.  FLOPs and wall-clock "
        "are against a dense multi-head fine-tune of the same network (same seeds, same run settings); "
        "wall-clock ratio = dense time / DST time (> 1: DST faster).", "",
        "| tasks | sparsity | init | growth | seeds | ACC | BWT | usage fc1 / fc2 | FLOPs / dense | wall-clock dense/DST |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        u = " / ".join(f"{v:.2f}" for v in r["usage_per_layer"].values())
        lines.append(f"| {r['n_tasks']} | {r['sparsity']:.0%} | {r['init']} | {r['growth']} | {r['seeds']} | "
                     f"{_pm(r['acc'])} | {_pm(r['bwt'])} | {u} | {r['flops_vs_dense']:.3f} | "
                     f"{_pm(r['wall_clock_ratio_dense_over_dst'])} |")
    for T, d in out["dense"].items():
        lines.append(f"| {T} | dense | – | multi-head fine-tune | – | {_pm(d['acc'])} | {_pm(d['bwt'])} | 1 / 1 | "
                     f"1 | 1 ({d['wall_clock_s']:.2f} s) |")
    lines += ["", "## Comparisons (ACC difference; beyond the spread when |diff| > 2·sqrt(s_a²/n_a + s_b²/n_b))", "",
              "| tasks | sparsity | comparison | diff | margin | beyond spread |", "|---|---|---|---|---|---|"]
    for cmp in out["comparisons"]:
        lines.append(f"| {cmp['n_tasks']} | {cmp['sparsity']:.0%} | {cmp['what']} | {cmp['diff']:+.2f} | "
                     f"{cmp['margin']:.2f} | {'yes' if cmp['beyond_spread'] else 'no'} |")
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
            ax.bar(xs, [rr[g]["acc"][0] for g in growths], w, yerr=[rr[g]["acc"][1] for g in growths], label=init,
                   capsize=2)
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
