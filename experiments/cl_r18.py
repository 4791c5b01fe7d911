"""ResNet-18 (nf 8) on the embedded MNIST subset resized to 32x32: issue 17 items 10-11.

Runs every (config, seed) as its own CLI process (one torch thread each, ``--jobs`` at a time),
appends one CSV row per run to ``experiments/results/r18_runs.csv`` and writes the tables
(``r18_main.md``, ``r18_diag.md``) with the one significance rule of ``sparsekern_cl.table``.

    python experiments/cl_r18.py --grid main --seeds 0 1 2 3 4 --jobs 2
    python experiments/cl_r18.py --grid diag --seeds 0 --jobs 2
    python experiments/cl_r18.py --table-only
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from sparsekern_cl.table import compare_paired, fmt_mean_std, verdict  # noqa: E402

RESULTS = os.path.join(HERE, "results")
CSV = os.path.join(RESULTS, "r18_runs.csv")
BASE = {
    "method": "derpp", "dataset": "mnist", "image_size": 32, "backbone": "resnet18", "nf": 8,
    "epochs": 1, "batch_size": 32, "lr": 0.03, "buffer_size": 500, "threads": 1,
    "progress": False, "plots": False, "save_checkpoints": False,
}  # fmt: skip
DST = {"method": "dst", "head": "multi", "optimizer": "adam", "lr": 0.001, "dst_update_every": 8}
# the paper's CIFAR-10 lr and τ; the grids below ran before esacl_rank existed, when SSE / ERE ranked the whole batch
ESACL = {"method": "esacl_derpp", "sparsity": 0.8, "lr": 0.01, "esacl_tau": 5.0, "esacl_rank": "batch"}
ESACL_PC = {**ESACL, "lr": 0.1, "epochs": 3, "esacl_rank": "per_class"}  # the default since: each class ranked alone
PC = "EsaCL-DER++ 0.8 lr 0.1 3 epochs per-class"
# (lr 0.03 with τ 2, the MLP grid's choice, diverges: Frank-Wolfe step not finite)
# DST after the BatchNorm fix: SGD lr 0.1, per-task BatchNorm and biases (dst_task_params private: the shared,
# frozen ones leave later tasks at 53-89 % Task-IL with 25 steps each, and diverge at lr 0.1), default update interval
DST1 = {"method": "dst", "head": "multi", "lr": 0.1, "dst_task_params": "private"}
GRIDS = {
    "main": {
        "dense DER++": {},
        "SparCL-DER++ 0.75": {"method": "sparcl_derpp", "sparsity": 0.75},
        "SparCL-DER++ 0.90": {"method": "sparcl_derpp", "sparsity": 0.9},
        "DST 0.8": {**DST, "sparsity": 0.8},
        "DST 0.9": {**DST, "sparsity": 0.9},
        "EsaCL-DER++ 0.8": ESACL,
    },
    "diag": {
        "DER++ 0.9": {"sparsity": 0.9},
        "DER++ 0.9 lr 0.1 (before the fix)": {"sparsity": 0.9, "lr": 0.1},
        "DER++ 0.9 no rescale": {"sparsity": 0.9, "sparse_rescale": False},
        "DER++ 0.9 ERK": {"sparsity": 0.9, "sparse_distribution": "erk"},
        "DER++ 0.9 all sparse": {"sparsity": 0.9, "keep_dense": []},
        "DER++ 0.9 reference backend": {"sparsity": 0.9, "backend": "reference"},
        "DER++ 0.9 stock optimizer": {"sparsity": 0.9, "sparse_optimizer": False},
        "DER++ 0.9 no rescale lr 0.1": {"sparsity": 0.9, "sparse_rescale": False, "lr": 0.1},
    },
    "lr01": {
        "dense DER++ lr 0.1": {"lr": 0.1},
        "SparCL-DER++ 0.75 lr 0.1": {"method": "sparcl_derpp", "sparsity": 0.75, "lr": 0.1},
        "DER++ 0.9 lr 0.1": {"sparsity": 0.9, "lr": 0.1},
    },
    "fixed": {  # after the BatchNorm fixes of DST and EsaCL, all at lr 0.1 (SGD)
        "SparCL-DER++ 0.90 lr 0.1": {"method": "sparcl_derpp", "sparsity": 0.9, "lr": 0.1},
        "DST 0.8 lr 0.1": {**DST1, "sparsity": 0.8},
        "DST 0.9 lr 0.1": {**DST1, "sparsity": 0.9},
        "EsaCL-DER++ 0.8 lr 0.1": {**ESACL, "lr": 0.1},
    },
    "epochs": {
        "dense DER++ lr 0.1 2 epochs": {"lr": 0.1, "epochs": 2},
        "dense DER++ lr 0.1 3 epochs": {"lr": 0.1, "epochs": 3},
    },
    "e3": {  # the "fixed" configurations at 3 epochs per task (dense DER++ still improved from 2 to 3)
        "dense DER++ lr 0.1 3 epochs": {"lr": 0.1, "epochs": 3},
        "SparCL-DER++ 0.75 lr 0.1 3 epochs": {"method": "sparcl_derpp", "sparsity": 0.75, "lr": 0.1, "epochs": 3},
        "SparCL-DER++ 0.90 lr 0.1 3 epochs": {"method": "sparcl_derpp", "sparsity": 0.9, "lr": 0.1, "epochs": 3},
        "DST 0.8 lr 0.1 3 epochs": {**DST1, "sparsity": 0.8, "epochs": 3},
        "DST 0.9 lr 0.1 3 epochs": {**DST1, "sparsity": 0.9, "epochs": 3},
        "EsaCL-DER++ 0.8 lr 0.1 3 epochs": {**ESACL, "lr": 0.1, "epochs": 3},
    },
    "e4": {"dense DER++ lr 0.1 4 epochs": {"lr": 0.1, "epochs": 4}},  # is dense still improving at 3?
    "e3dst": {  # DST's ablations at 3 epochs (against the e3 grid's uniform / fixed-growth DST rows)
        "DST 0.8 lr 0.1 3 epochs ERK": {**DST1, "sparsity": 0.8, "epochs": 3, "sparse_distribution": "erk"},
        "DST 0.9 lr 0.1 3 epochs ERK": {**DST1, "sparsity": 0.9, "epochs": 3, "sparse_distribution": "erk"},
        "DST 0.9 lr 0.1 3 epochs adaptive": {**DST1, "sparsity": 0.9, "epochs": 3, "dst_growth": "adaptive_naive"},
    },
    "e3pc": {  # EsaCL with per-class SSE / ERE ranking (esacl_rank: per_class), 3 epochs, and its ablations
        PC: ESACL_PC,
        f"{PC} w/o SA": {**ESACL_PC, "esacl_sa": False},
        f"{PC} w/o SP": {**ESACL_PC, "esacl_sp": False},
        "EsaCL-DER++ 0.8 lr 0.1 3 epochs w/o SSE/ERE": {**ESACL_PC, "esacl_sse": False, "esacl_ere": False},
    },
    "abl01": {
        "DST 0.8 lr 0.1 ERK": {**DST1, "sparsity": 0.8, "sparse_distribution": "erk"},
        "DST 0.9 lr 0.1 ERK": {**DST1, "sparsity": 0.9, "sparse_distribution": "erk"},
        "DST 0.9 lr 0.1 adaptive": {**DST1, "sparsity": 0.9, "dst_growth": "adaptive_naive"},
        "EsaCL-DER++ 0.8 lr 0.1 w/o SA": {**ESACL, "lr": 0.1, "esacl_sa": False},
        "EsaCL-DER++ 0.8 lr 0.1 w/o SP": {**ESACL, "lr": 0.1, "esacl_sp": False},
        "EsaCL-DER++ 0.8 lr 0.1 w/o SSE/ERE": {**ESACL, "lr": 0.1, "esacl_sse": False, "esacl_ere": False},
    },
    "abl": {
        "EsaCL-DER++ 0.8 w/o SA": {**ESACL, "esacl_sa": False},
        "EsaCL-DER++ 0.8 w/o SP": {**ESACL, "esacl_sp": False},
        "EsaCL-DER++ 0.8 w/o SSE/ERE": {**ESACL, "esacl_sse": False, "esacl_ere": False},
        "DST 0.8 ERK": {**DST, "sparsity": 0.8, "sparse_distribution": "erk"},
        "DST 0.9 ERK": {**DST, "sparsity": 0.9, "sparse_distribution": "erk"},
        "DST 0.9 adaptive": {**DST, "sparsity": 0.9, "dst_growth": "adaptive_naive"},
    },
}
FIELDS = ["grid", "label", "seed", "class_il", "task_il", "bwt_class_il", "train_flops", "dense_train_flops",
          "wall_clock_s", "sparse_compute", "commit", "overrides", "command"]  # fmt: skip


def cli_args(cfg: dict) -> list[str]:
    return [
        a for k, v in cfg.items() for a in (f"--{k.replace('_', '-')}", json.dumps(v) if not isinstance(v, str) else v)
    ]


def run_one(grid: str, label: str, overrides: dict, seed: int) -> dict:
    cfg = {**BASE, **overrides, "seed": seed}
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "sparsekern_cl", *cli_args(cfg), "--output-dir", out]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(HERE))  # fmt: skip
        if done.returncode:  # a diverged run is reported, not fatal to the grid
            print(f"{label} seed {seed}: {done.stderr.strip().splitlines()[-1]}", file=sys.stderr)
            return None
        with open(os.path.join(out, "results.json")) as f:
            r = json.load(f)
    env_info = r.get("environment", {})
    return {
        "grid": grid, "label": label, "seed": seed, "class_il": r["avg_acc"]["class_il"],
        "task_il": r["avg_acc"]["task_il"], "bwt_class_il": r["bwt"]["class_il"], "train_flops": r["train_flops"],
        "dense_train_flops": r["dense_train_flops"], "wall_clock_s": r["wall_clock_s"],
        "sparse_compute": env_info.get("sparse_compute"), "commit": env_info.get("commit"),
        "overrides": json.dumps(overrides, sort_keys=True),
        "command": "python -m sparsekern_cl " + " ".join(cli_args(cfg)),
    }  # fmt: skip


def read_rows() -> list[dict]:
    if not os.path.exists(CSV):
        return []
    with open(CSV, newline="") as f:
        return list(csv.DictReader(f))


def append_row(row: dict) -> None:
    new = not os.path.exists(CSV)
    with open(CSV, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)


def by_seed(rows: list[dict], label: str, key: str) -> dict:
    return {int(r["seed"]): float(r[key]) for r in rows if r["label"] == label}


def table(rows: list[dict], labels: list[str], ref: str = "dense DER++") -> list[str]:
    dense_wall = by_seed(rows, ref, "wall_clock_s")
    out = ["| config | seeds | Class-IL % | Task-IL % | BWT Class-IL | train FLOPs (dense-eq.) | FLOPs / dense DER++ "
           "| wall-clock / dense DER++ (busy machine) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    dense_fl = by_seed(rows, ref, "train_flops")
    for lab in labels:
        ci = by_seed(rows, lab, "class_il")
        if not ci:
            continue
        fl, wall = by_seed(rows, lab, "train_flops"), by_seed(rows, lab, "wall_clock_s")
        fr = [fl[s] / dense_fl[s] for s in fl if s in dense_fl]
        wr = [wall[s] / dense_wall[s] for s in wall if s in dense_wall]
        dfl = by_seed(rows, lab, "dense_train_flops")
        out.append(f"| {lab} | {len(ci)} | {fmt_mean_std(list(ci.values()))} | "
                   f"{fmt_mean_std(list(by_seed(rows, lab, 'task_il').values()))} | "
                   f"{fmt_mean_std(list(by_seed(rows, lab, 'bwt_class_il').values()))} | "
                   f"{sum(fl.values()) / len(fl) / 1e12:.3f} T ({sum(dfl.values()) / len(dfl) / 1e12:.3f} T) | "
                   f"{fmt_mean_std(fr, 3) if fr else '-'} | {fmt_mean_std(wr, 2) if wr else '-'} |")  # fmt: skip
    return out


def comparisons(rows: list[dict], pairs: list[tuple[str, str]], key: str = "class_il") -> list[str]:
    fam = [(a, b, by_seed(rows, a, key), by_seed(rows, b, key)) for a, b in pairs if by_seed(rows, a, key)
           and by_seed(rows, b, key)]  # fmt: skip
    out = [f"| {key}: a - b | seeds | mean diff | verdict (paired t, Holm) |", "|---|---|---|---|"]
    for c in compare_paired(fam):
        out.append(f"| {c['a']} - {c['b']} | {c['n']} | {c['diff']:+.2f} | {verdict(c)} |")
    return out


CLAIMS = [
    ("SparCL-DER++ 0.75", "dense DER++"),
    ("SparCL-DER++ 0.75 lr 0.1", "dense DER++ lr 0.1"),
    ("DER++ 0.9 lr 0.1", "dense DER++ lr 0.1"),
    ("SparCL-DER++ 0.90", "dense DER++"),
    ("DST 0.8", "DST 0.8 ERK"),
    ("DST 0.9", "DST 0.9 ERK"),
    ("DST 0.9 adaptive", "DST 0.9"),
    ("SparCL-DER++ 0.90 lr 0.1", "dense DER++ lr 0.1"),
    ("DST 0.8 lr 0.1", "DST 0.8 lr 0.1 ERK"),
    ("DST 0.9 lr 0.1", "DST 0.9 lr 0.1 ERK"),
    ("DST 0.9 lr 0.1 adaptive", "DST 0.9 lr 0.1"),
    ("EsaCL-DER++ 0.8 lr 0.1 w/o SA", "EsaCL-DER++ 0.8 lr 0.1"),
    ("EsaCL-DER++ 0.8 lr 0.1 w/o SP", "EsaCL-DER++ 0.8 lr 0.1"),
    ("EsaCL-DER++ 0.8 lr 0.1 w/o SSE/ERE", "EsaCL-DER++ 0.8 lr 0.1"),
    ("dense DER++ lr 0.1 2 epochs", "dense DER++ lr 0.1"),
    ("dense DER++ lr 0.1 3 epochs", "dense DER++ lr 0.1"),
    ("EsaCL-DER++ 0.8 w/o SA", "EsaCL-DER++ 0.8"),
    ("EsaCL-DER++ 0.8 w/o SP", "EsaCL-DER++ 0.8"),
    ("EsaCL-DER++ 0.8 w/o SSE/ERE", "EsaCL-DER++ 0.8"),
]


E3_REF = "dense DER++ lr 0.1 3 epochs"
CLAIMS_E3 = [
    ("SparCL-DER++ 0.75 lr 0.1 3 epochs", E3_REF),
    ("SparCL-DER++ 0.90 lr 0.1 3 epochs", E3_REF),
    ("EsaCL-DER++ 0.8 lr 0.1 3 epochs", E3_REF),
    ("dense DER++ lr 0.1 4 epochs", E3_REF),
    (PC, E3_REF),
    (PC, "EsaCL-DER++ 0.8 lr 0.1 3 epochs"),
]
CLAIMS_DST3 = [
    ("DST 0.8 lr 0.1 3 epochs", "DST 0.8 lr 0.1 3 epochs ERK"),
    ("DST 0.9 lr 0.1 3 epochs", "DST 0.9 lr 0.1 3 epochs ERK"),
    ("DST 0.9 lr 0.1 3 epochs adaptive", "DST 0.9 lr 0.1 3 epochs"),
]
CLAIMS_PC = [(f"{PC} w/o SA", PC), (f"{PC} w/o SP", PC), ("EsaCL-DER++ 0.8 lr 0.1 3 epochs w/o SSE/ERE", PC)]


def write_tables(out_dir: str = RESULTS) -> None:
    rows = read_rows()
    head = ["Generated by `python experiments/cl_r18.py --table-only` from `r18_runs.csv` (its `command` column "
            "holds each run's exact CLI). ResNet-18 nf 8 on the embedded MNIST subset resized to 32x32, 5 tasks, "
            "1 epoch per task, batch 32, DER++ buffer 500; one torch thread per run, two runs at a time on a "
            "2-core machine shared with other jobs: wall-clock ratios are noisy (run against the same seed's "
            "dense DER++ run, not in the same process).", ""]  # fmt: skip
    main = [*head, *table(rows, [*GRIDS["main"], *GRIDS["lr01"], *GRIDS["fixed"], *GRIDS["epochs"], *GRIDS["abl01"],
            *GRIDS["abl"]]), "",
            "Directional claims (Class-IL, one family, paired over seeds, Holm, p < 0.05):", "",
            *comparisons(rows, CLAIMS), "", *comparisons(rows, CLAIMS[:4], "task_il"), "",
            "At 3 epochs per task (FLOPs and wall-clock against the same seed's 3-epoch dense DER++ run; "
            "DST is multi-head, Task-IL is its measure):", "",
            *table(rows, [*GRIDS["e3"], *GRIDS["e4"], *GRIDS["e3dst"], *GRIDS["e3pc"]], ref=E3_REF), "",
            *comparisons(rows, CLAIMS_E3), "", *comparisons(rows, CLAIMS_E3[:3], "task_il"), "",
            "EsaCL's ablations at 3 epochs with per-class ranking (the paper: removing SA, SP or SSE/ERE hurts):",
            "", *comparisons(rows, CLAIMS_PC), "", *comparisons(rows, CLAIMS_PC, "task_il"), "",
            "DST at 3 epochs (the paper: uniform better than ERK at high sparsity, ERK at low; adaptive growth "
            "at least as good as fixed; multi-head, so Task-IL is its measure):", "",
            *comparisons(rows, CLAIMS_DST3, "task_il")]  # fmt: skip
    pre = "SparCL-DER++ 0.75 (rescale before the fix)"
    diag = [*head, "Diagnosis of sparse DER++ at 0.9, seed 0; the rows from `DER++ 0.9` to the pre-fix SparCL "
            "row ran before the `sparse_rescale` fix (after it, `DER++ 0.9` behaves as `DER++ 0.9 no rescale`); "
            "dense DER++ for reference:", "", *table(rows, ["dense DER++", *GRIDS["diag"], pre, "SparCL-DER++ 0.75"]), "",
            *comparisons(rows, [("SparCL-DER++ 0.75", pre)])]  # fmt: skip
    for name, lines in (("r18_main.md", main), ("r18_diag.md", diag)):
        with open(os.path.join(out_dir, name), "w") as f:
            f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", choices=sorted(GRIDS), action="append", default=[])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--only", nargs="+", default=None, help="labels to run (default: the whole grid)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--out", default=RESULTS, help="folder of the tables (default: experiments/results)")
    args = p.parse_args(argv)
    if not args.table_only:
        done = {(r["label"], int(r["seed"])) for r in read_rows()}
        todo = [(g, lab, ov, s) for g in args.grid for s in args.seeds for lab, ov in GRIDS[g].items()
                if (args.only is None or lab in args.only) and (lab, s) not in done]  # fmt: skip
        with ThreadPoolExecutor(args.jobs) as pool:
            for fut in as_completed([pool.submit(run_one, *t) for t in todo]):
                row = fut.result()
                if row is None:
                    continue
                append_row(row)
                print(row["label"], row["seed"], row["class_il"], row["task_il"], row["wall_clock_s"], flush=True)
    write_tables(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
