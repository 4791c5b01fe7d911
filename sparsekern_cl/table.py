"""Aggregate runs into tables: ``python -m sparsekern_cl.table RUNS ... [--out PREFIX]``.

``RUNS`` are ``results.json`` files of single runs or curated CSVs of runs (:func:`write_runs`).
Every experiment table of the project (the baselines, SparCL, EsaCL, DST; ``experiments/``) is
made with this module, so all of them state results and differences the same way:

* **Spread.** A configuration's result is the mean ± the sample standard deviation (``n - 1``
  in the denominator) over its seeds (:func:`mean_std`).
* **Differences.** Two configurations are compared on the seeds both ran, *paired by seed* (the
  same seed gives both runs the same data split, data order and initial weights): the per-seed
  differences ``d_s = a_s - b_s`` go into a two-sided paired t-test, ``t = mean(d) / (sd(d) /
  sqrt(n))`` with ``n - 1`` degrees of freedom (:func:`paired_test`; all ``d_s`` equal gives
  ``p = 0``, or ``p = 1`` when they are all zero).  The p-values of the comparisons listed
  together (those one table makes of one setting, Class-IL or Task-IL) are corrected as one family
  with Holm's step-down method (:func:`holm`), and a difference is
  called **significant** when its corrected p-value is below :data:`ALPHA` = 0.05; otherwise it
  is within noise.  With fewer than two paired seeds nothing is tested.

Grouping (of ``results.json`` runs): by method, buffer size (replay methods only) and sparsity,
the final average accuracy of each setting (Class-IL, Task-IL).  ``--select`` picks, per method,
the hyperparameters with the best mean validation accuracy (validation runs only).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence

__all__ = [
    "ALPHA",
    "RULE",
    "mean_std",
    "fmt_mean_std",
    "paired_test",
    "holm",
    "compare_paired",
    "verdict",
    "comparison_table",
    "flat_result",
    "table_command",
    "write_runs",
    "read_runs",
    "group_results",
    "markdown_table",
    "compare_groups",
    "select_best",
    "main",
]

ALPHA = 0.05
RULE = (
    "Differences are paired by seed: a two-sided paired t-test on the per-seed differences, its p-values "
    "Holm-corrected over the comparisons listed together; **significant** when the corrected p < 0.05, "
    "otherwise within noise (`sparsekern_cl/table.py`)."
)

HYPER = ("lr", "alpha", "beta", "ewc_lambda")

REPLAY = ("er", "derpp")
ORDER = ("joint", "derpp", "er", "ewc", "finetune")


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = list(values)
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_mean_std(values: Sequence[float], digits: int = 2, scale: float = 1.0) -> str:
    """``"mean ± std"`` of ``values`` times ``scale``."""
    m, s = mean_std(values)
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below the mean
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    frac = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # fmt: skip
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            frac *= c * d
        if abs(c * d - 1.0) < 1e-14:
            break
    return math.exp(log_front) * frac / a


def _t_two_sided(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def paired_test(a: Mapping, b: Mapping) -> dict:
    """Two-sided paired t-test of ``a - b`` over the keys (seeds) both have.

    Returns ``{"n", "diff" (mean difference), "sd" (of the differences), "t", "p"}``; ``t`` and
    ``p`` are None with fewer than two paired seeds.
    """
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    n = len(d)
    if n == 0:
        return {"n": 0, "diff": float("nan"), "sd": float("nan"), "t": None, "p": None}
    diff, sd = mean_std(d)
    if n < 2:
        return {"n": n, "diff": diff, "sd": sd, "t": None, "p": None}
    if sd == 0.0:
        return {"n": n, "diff": diff, "sd": sd, "t": math.copysign(math.inf, diff) if diff else 0.0,
                "p": 0.0 if diff else 1.0}  # fmt: skip
    t = diff / (sd / math.sqrt(n))
    return {"n": n, "diff": diff, "sd": sd, "t": t, "p": _t_two_sided(t, n - 1)}


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down correction of ``pvalues`` (None entries are not tests and stay None)."""
    idx = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    m = len(idx)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def compare_paired(pairs: Sequence[tuple[str, str, Mapping, Mapping]], alpha: float = ALPHA) -> list[dict]:
    """One family of comparisons: ``(label_a, label_b, {seed: value_a}, {seed: value_b})`` each.

    Returns per pair the :func:`paired_test` fields plus ``a``, ``b``, ``p_holm`` (corrected over
    this family) and ``significant``.
    """
    tests = [paired_test(va, vb) for _, _, va, vb in pairs]
    adj = holm([t["p"] for t in tests])
    return [{"a": la, "b": lb, **t, "p_holm": ph, "significant": ph is not None and ph < alpha}
            for (la, lb, _, _), t, ph in zip(pairs, tests, adj)]  # fmt: skip


def verdict(c: dict) -> str:
    """``significant (p = 0.003)`` / ``within noise (p = 0.41)`` / ``not tested (1 paired seed)``, p Holm-corrected."""
    if c["p_holm"] is None:
        return f"not tested ({c['n']} paired seed{'s' if c['n'] != 1 else ''})"
    return f"{'significant' if c['significant'] else 'within noise'} (p = {c['p_holm']:.2g})"


def table_command(script: str, argv: Sequence[str]) -> str:
    """The command line an experiment's table states: ``python SCRIPT ARGS`` without the options
    that only say where files go or that nothing is run (``--out``, ``--runs``, ``--table-only``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--out", "--runs"):
            skip = True
        elif a != "--table-only" and not a.startswith(("--out=", "--runs=")):
            out.append(a)
    return " ".join(["python", script, *out])


# ------------------------------------------------------------------------------------------------
# runs as curated CSV rows
# ------------------------------------------------------------------------------------------------


def flat_result(r: dict) -> dict:
    """The fields of a ``results.json`` the tables use, as one flat row (see :func:`write_runs`)."""
    cfg = r["config"]
    row = {"label": _label(cfg), "method": cfg["method"], "buffer_size": cfg.get("buffer_size"),
           "sparsity": cfg.get("sparsity", 0.0), "seed": cfg["seed"], **{k: cfg.get(k) for k in HYPER},
           "eval_split": r.get("scenario", {}).get("eval_split", ""), "complete": r.get("complete", True)}  # fmt: skip
    for s in ("class_il", "task_il"):
        row[s] = r["avg_acc"].get(s)
        row[f"bwt_{s}"] = r.get("bwt", {}).get(s)
    row.update(train_flops=r.get("train_flops"), dense_train_flops=r.get("dense_train_flops"),
               wall_clock_s=r.get("wall_clock_s"))  # fmt: skip
    return row


def _cell(v):
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return v


def write_runs(path: str, runs: Sequence[dict], columns: Sequence[str] | None = None) -> None:
    """One CSV row per run (the curated form of an experiment's runs); dict / list cells as JSON."""
    cols = list(columns) if columns else list(dict.fromkeys(k for r in runs for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in runs:
            w.writerow({k: _cell(r.get(k)) for k in cols})


def _parse(v: str):
    if v == "":
        return None
    if v in ("True", "False"):
        return v == "True"
    if v[0] in "[{":
        return json.loads(v)
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def read_runs(path: str) -> list[dict]:
    """The rows of a :func:`write_runs` CSV, cells parsed back (numbers, booleans, JSON, "" as None)."""
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


# ------------------------------------------------------------------------------------------------
# grouping by method / buffer / sparsity
# ------------------------------------------------------------------------------------------------


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
    return (rank, m, cfg["buffer_size"] if m in REPLAY else 0, cfg.get("sparsity") or 0.0)


def _flat(r: dict) -> dict:
    return flat_result(r) if "config" in r else r


def group_results(results: list[dict]) -> list[dict]:
    """One row per configuration group: label, seeds, and per setting the mean, std, values and
    ``by_seed`` values.  ``results`` are ``results.json`` dicts or :func:`flat_result` rows."""
    groups: dict = {}
    for r in map(_flat, results):
        if not r.get("complete", True):
            continue
        g = groups.setdefault(_key(r), {"label": r["label"], "seeds": [], "class_il": [], "task_il": [],
                                        "train_flops": [], "wall_clock_s": []})  # fmt: skip
        g["seeds"].append(r["seed"])
        for s in ("class_il", "task_il", "train_flops", "wall_clock_s"):
            g[s].append(r[s])
    rows = []
    for k in sorted(groups):
        g = groups[k]
        row = {"label": g["label"], "n": len(g["seeds"]), "seeds": sorted(g["seeds"])}
        for s in ("class_il", "task_il"):
            m, sd = mean_std(g[s])
            row[s] = {"mean": m, "std": sd, "values": g[s], "by_seed": dict(zip(g["seeds"], g[s]))}
        row["train_flops"] = statistics.fmean(g["train_flops"])
        row["wall_clock_s"] = statistics.fmean(g["wall_clock_s"])
        rows.append(row)
    return rows


def compare_groups(rows: list[dict], setting: str = "class_il") -> list[dict]:
    """Every pair of rows, as one family of paired comparisons (:func:`compare_paired`)."""
    pairs = [(a["label"], b["label"], a[setting]["by_seed"], b[setting]["by_seed"])
             for i, a in enumerate(rows) for b in rows[i + 1 :]]  # fmt: skip
    return compare_paired(pairs)


def select_best(results: list[dict], setting: str = "class_il") -> dict:
    """Per method (and buffer size): the hyperparameters with the best mean ``setting`` accuracy over seeds.

    Meant for runs on a validation split; refuses results evaluated on the test split.
    """
    cands: dict = {}
    for r in map(_flat, results):
        if r["eval_split"] != "val":
            raise ValueError(
                f"select_best: a run ({r['label']}, seed {r['seed']}) was evaluated on the test "
                "split; choose hyperparameters on a validation split (validation > 0)"
            )
        hp = tuple((k, r[k]) for k in HYPER)
        cands.setdefault(r["label"], {}).setdefault(hp, []).append(r[setting])
    best = {}
    for label, by_hp in cands.items():
        hp, vals = max(by_hp.items(), key=lambda kv: statistics.fmean(kv[1]))
        best[label] = {
            "hyperparameters": dict(hp),
            "val_mean": statistics.fmean(vals),
            "seeds": len(vals),
            "candidates": len(by_hp),
        }
    return best


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| method | seeds | Class-IL (%) | Task-IL (%) | train FLOPs | train time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        c, t = r["class_il"], r["task_il"]
        lines.append(
            f"| {r['label']} | {r['n']} | {c['mean']:.2f} ± {c['std']:.2f} | "
            f"{t['mean']:.2f} ± {t['std']:.2f} | {r['train_flops']:.3g} | {r['wall_clock_s']:.1f} |"
        )
    return "\n".join(lines)


def comparison_table(pairs: list[dict], digits: int = 2) -> list[str]:
    """Markdown rows of a family of comparisons: difference, spread of the differences, p, verdict."""
    out = [
        "| comparison | paired seeds | mean difference | std of differences | p (Holm) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for c in pairs:
        p = "–" if c["p_holm"] is None else f"{c['p_holm']:.2g}"
        out.append(
            f"| {c['a']} − {c['b']} | {c['n']} | {c['diff']:+.{digits}f} | {c['sd']:.{digits}f} | {p} | "
            f"{'**significant**' if c['significant'] else verdict(c).split(' (')[0]} |"
        )
    return out


def _selection_markdown(best: dict, setting: str) -> str:
    lines = [
        f"Hyperparameters chosen per method on the validation split (best mean {setting.replace('_', '-')} "
        "accuracy over the validation seeds):",
        "",
        "| method | hyperparameters | validation accuracy (%) | seeds | candidates |",
        "|---|---|---|---|---|",
    ]
    for label, b in best.items():
        hp = ", ".join(f"{k} {v}" for k, v in b["hyperparameters"].items() if v is not None)
        lines.append(f"| {label} | {hp} | {b['val_mean']:.2f} | {b['seeds']} | {b['candidates']} |")
    return "\n".join(lines)


def _load(files: list[str]) -> list[dict]:
    runs = []
    for f in files:
        if f.endswith(".csv"):
            runs += read_runs(f)
        else:
            with open(f) as fh:
                runs.append(flat_result(json.load(fh)))
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsekern_cl.table", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="results.json files or curated runs CSVs")
    p.add_argument("--out", help="write the table (or the selection) to PREFIX.md")
    p.add_argument("--json", help="write the rows and comparisons (or the selection) as JSON to this file")
    p.add_argument("--csv", help="write every run given as one curated CSV row to this file")
    p.add_argument("--split", choices=["test", "val"], help="only the runs evaluated on this split")
    p.add_argument(
        "--setting",
        default="class_il",
        choices=["class_il", "task_il"],
        help="setting of the pairwise comparison (or of the selection)",
    )
    p.add_argument(
        "--select",
        action="store_true",
        help="the best hyperparameters per method (validation runs) instead of the table",
    )
    args = p.parse_args(argv)
    results = _load(args.files)
    if args.csv:  # every run given, whatever --split keeps for the table
        write_runs(args.csv, results)
    results = [r for r in results if args.split is None or r["eval_split"] == args.split]
    if args.select:
        best = select_best(results, args.setting)
        print(json.dumps(best, indent=1))
        payload, text = best, _selection_markdown(best, args.setting)
    else:
        rows = group_results(results)
        pairs = compare_groups(rows, args.setting)
        text = "\n".join([markdown_table(rows), "",
                          f"Pairwise {args.setting.replace('_', '-')} differences. {RULE}", "",
                          *comparison_table(pairs)])  # fmt: skip
        print(text)
        payload = {"rows": rows, "pairs": pairs}
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
