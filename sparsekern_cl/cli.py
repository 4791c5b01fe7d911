"""Command line: ``python -m sparsekern_cl [--preset NAME] [--config FILE] [--KEY VALUE ...]``."""

from __future__ import annotations

import sys

from sparsekern import BackendError
from sparsekern.env import prog_name

from .config import build_parser
from .data import DatasetError
from .runner import run

__all__ = ["main", "format_summary"]


def _flops(x: float) -> str:
    return f"{x / 1e12:.3f} TFLOP" if x >= 1e11 else f"{x / 1e9:.3f} GFLOP"


def _line(label: str, res: dict) -> str:
    a = res["avg_acc"]
    return (
        f"{label:8s} Class-IL {a['class_il']:6.2f} %   Task-IL {a['task_il']:6.2f} %   "
        f"train FLOPs {_flops(res['train_flops'])} (dense-equivalent {_flops(res['dense_train_flops'])})   "
        f"train time {res['wall_clock_s']:.1f} s"
    )


def _ran_on(env: dict) -> list[str]:
    """What the sparse layers ran on during training, from the per-layer record (``layer_runs``):
    ``["cpp"]`` when every layer ran its sparse kernels, else each path with its layer count, e.g.
    ``["cpp (14 layers)", "dense (3 layers, the automatic choice)"]``; the selected backends when
    a result has no per-layer record."""
    runs = env.get("layer_runs")
    if not runs:
        return sorted(set(env.get("layer_backends", {}).values()))
    counts: dict[str, int] = {}
    for ran in runs.values():
        for r in ran or ["not run"]:
            path, _, backend = r.partition("/")
            label = "dense (the automatic choice)" if path == "dense" else (backend or path)
            counts[label] = counts.get(label, 0) + 1
    if len(counts) == 1:
        return list(counts)
    return [
        f"{k.split(' (')[0]} ({n} layer{'s' if n != 1 else ''}{', ' + k.split(' (')[1][:-1] if ' (' in k else ''})"
        for k, n in sorted(counts.items(), key=lambda kv: -kv[1])
    ]


def format_summary(res: dict) -> str:
    """A few human-readable lines about a finished (or stopped) run."""
    c = res["config"]
    head = (
        f"{c['method']} on {res['scenario']['dataset']} ({res['scenario']['n_tasks']} tasks, "
        f"{res.get('user_model', c['backbone'])}, "
        f"{c['epochs']} epoch(s)/task, seed {c['seed']}, eval on {res['scenario']['eval_split']})"
    )
    if "diverged" in res:
        d = res["diverged"]
        return head + (
            f"\ndiverged at task {d['task']}, epoch {d['epoch']}, step {d['step']}: {d['reason']}; the run stopped "
            "there (complete: false) and its last checkpoint is kept; try a lower lr"
        )
    if not res["complete"]:
        return head + f"\nstopped after {res['tasks_done']} of {res['scenario']['n_tasks']} tasks; resume with --resume"
    lines = [head]
    backends = _ran_on(res["environment"])
    if "dense_reference" in res:
        lines.append(_line("dense", res["dense_reference"]))
        lines.append(_line(f"{c['sparsity']:.0%} sp.", res))
        lines.append(
            f"sparse layers ran on: {', '.join(backends) or 'none'}; "
            f"FLOPs ratio dense/sparse {res['dense_reference']['train_flops'] / res['train_flops']:.2f}x; "
            f"measured wall-clock ratio dense/sparse {res['wall_clock_ratio']:.2f}x "
            f"({res['environment']['torch_threads']} threads)"
        )
    else:
        lines.append(_line("result", res))
        if backends:
            lines.append(f"sparse layers ran on: {', '.join(backends)}; model sparsity {res['model_sparsity']:.3f}")
    fwt = res["fwt"]
    fwt_text = (
        f"FWT Class-IL {fwt['class_il']:.2f}  Task-IL {fwt['task_il']:.2f}"
        if fwt["class_il"] is not None
        else "FWT not defined (multi-head)"
    )
    lines.append(f"BWT Class-IL {res['bwt']['class_il']:.2f}  Task-IL {res['bwt']['task_il']:.2f};  {fwt_text}")
    if res["environment"].get("sparse_compute") is False:
        lines.append("not sparse compute: " + "; ".join(res["environment"]["not_sparse_compute"]))
    if c.get("output_dir"):
        lines.append(f"results: {c['output_dir']}/results.json")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser(prog_name("sparsekern-cl", "sparsekern_cl")).parse_args(argv))
    config = {k: v for k, v in args.items() if v is not None or k not in ("config", "preset")}
    try:
        res = run(config)
    except (ValueError, OSError, DatasetError, BackendError) as exc:  # bad input: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if res.get("data_parallel", {}).get("rank", 0) == 0:  # one summary for a torchrun job
        print(format_summary(res))
    return 1 if "diverged" in res else 0
