"""Aggregate result files into a table: ``python -m sparsekern_cl.table RESULTS.json ... [--out PREFIX]``.

Runs are grouped by method, buffer size (replay methods only) and sparsity; each group shows the
mean ± sample standard deviation of the final average accuracy over its seeds, Class-IL and
Task-IL.  Then every pair of groups is compared in Class-IL: a difference *exceeds the spread*
when ``|mean_a - mean_b| > 2 * sqrt(s_a²/n_a + s_b²/n_b)`` (about a 95 % interval of the
difference of two means), otherwise it is reported as within noise.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

__all__ = ["group_results", "markdown_table", "compare_groups", "select_best", "main"]

HYPER = ("lr", "alpha", "beta", "ewc_lambda")

REPLAY = ("er", "derpp")
ORDER = ("joint", "derpp", "er", "ewc", "finetune")


def _label(cfg: dict) -> str:
    s = cfg["method"]
    if cfg["method"] in REPLAY:
        s += f" (buffer {cfg['buffer_size']})"
    if cfg.get("sparsity"):
        s += f" {cfg['sparsity']:.0%} sparse"
    return s


def _key(cfg: dict):
    m = cfg["method"]
    rank = ORDER.index(m) if m in ORDER else len(ORDER)
    return (rank, m, cfg["buffer_size"] if m in REPLAY else 0, cfg.get("sparsity", 0.0))


def group_results(results: list[dict]) -> list[dict]:
    """One row per configuration group: label, seeds, and mean/std/values per setting."""
    groups: dict = {}
    for r in results:
        if not r.get("complete", True):
            continue
        cfg = r["config"]
        g = groups.setdefault(_key(cfg), {"label": _label(cfg), "seeds": [], "class_il": [], "task_il": [],
                                          "train_flops": [], "wall_clock_s": []})
        g["seeds"].append(cfg["seed"])
        for s in ("class_il", "task_il"):
            g[s].append(r["avg_acc"][s])
        g["train_flops"].append(r["train_flops"])
        g["wall_clock_s"].append(r["wall_clock_s"])
    rows = []
    for k in sorted(groups):
        g = groups[k]
        row = {"label": g["label"], "n": len(g["seeds"]), "seeds": sorted(g["seeds"])}
        for s in ("class_il", "task_il"):
            vals = g[s]
            row[s] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                      "values": vals}
        row["train_flops"] = statistics.fmean(g["train_flops"])
        row["wall_clock_s"] = statistics.fmean(g["wall_clock_s"])
        rows.append(row)
    return rows


def compare_groups(rows: list[dict], setting: str = "class_il") -> list[dict]:
    """Every pair of rows: difference of means, the 2-sigma spread of that difference, and the verdict."""
    out = []
    for i, a in enumerate(rows):
        for b in rows[i + 1 :]:
            da, db = a[setting], b[setting]
            diff = da["mean"] - db["mean"]
            spread = 2 * math.sqrt(da["std"] ** 2 / a["n"] + db["std"] ** 2 / b["n"])
            out.append({"a": a["label"], "b": b["label"], "diff": diff, "spread": spread,
                        "exceeds": abs(diff) > spread})
    return out


def select_best(results: list[dict], setting: str = "class_il") -> dict:
    """Per method (and buffer size): the hyperparameters with the best mean ``setting`` accuracy over seeds.

    Meant for runs on a validation split; refuses results evaluated on the test split.
    """
    cands: dict = {}
    for r in results:
        cfg = r["config"]
        if r["scenario"]["eval_split"] != "val":
            raise ValueError(f"select_best: a run ({_label(cfg)}, seed {cfg['seed']}) was evaluated on the test "
                             "split; choose hyperparameters on a validation split (validation > 0)")
        hp = tuple((k, cfg[k]) for k in HYPER)
        cands.setdefault(_label(cfg), {}).setdefault(hp, []).append(r["avg_acc"][setting])
    best = {}
    for label, by_hp in cands.items():
        hp, vals = max(by_hp.items(), key=lambda kv: statistics.fmean(kv[1]))
        best[label] = {"hyperparameters": dict(hp), "val_mean": statistics.fmean(vals), "seeds": len(vals),
                       "candidates": len(by_hp)}
    return best


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | seeds | Class-IL (%) | Task-IL (%) | train FLOPs | train time (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        c, t = r["class_il"], r["task_il"]
        lines.append(f"| {r['label']} | {r['n']} | {c['mean']:.2f} ± {c['std']:.2f} | "
                     f"{t['mean']:.2f} ± {t['std']:.2f} | {r['train_flops']:.3g} | {r['wall_clock_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsekern_cl.table", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="results.json files")
    p.add_argument("--out", help="write PREFIX.md and PREFIX.json")
    p.add_argument("--setting", default="class_il", choices=["class_il", "task_il"],
                   help="setting of the pairwise comparison (or of the selection)")
    p.add_argument("--select", action="store_true",
                   help="print the best hyperparameters per method (validation runs) as JSON instead")
    args = p.parse_args(argv)
    results = []
    for f in args.files:
        with open(f) as fh:
            results.append(json.load(fh))
    if args.select:
        best = select_best(results, args.setting)
        print(json.dumps(best, indent=1))
        if args.out:
            with open(args.out + ".json", "w") as f:
                json.dump(best, f, indent=1)
        return 0
    rows = group_results(results)
    pairs = compare_groups(rows, args.setting)
    text = [markdown_table(rows), "",
            f"Pairwise {args.setting.replace('_', '-')} differences (exceeds the spread when "
            "|Δ| > 2·sqrt(s_a²/n_a + s_b²/n_b)):", ""]
    for c in pairs:
        verdict = "exceeds the spread" if c["exceeds"] else "within noise"
        text.append(f"- {c['a']} − {c['b']}: {c['diff']:+.2f} (spread {c['spread']:.2f}) — {verdict}")
    out = "\n".join(text)
    print(out)
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write(out + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump({"rows": rows, "pairs": pairs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
