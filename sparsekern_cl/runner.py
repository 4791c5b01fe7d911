"""The training loop behind ``sparsekern_cl.run`` and ``python -m sparsekern_cl``."""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import platform
import sys
import time
from contextlib import nullcontext

import torch

import sparsekern

from . import __version__, parallel, provenance
from .backbones import build_backbone, sparsify_from_config
from .config import resolve_config
from .data import Scenario, TaskData, build_scenario, user_scenario
from .flops import FlopCounter, layer_densities, memory_footprint, model_capacity
from .logs import RunLog
from .metrics import summarize
from .registry import get_method, register_method

__all__ = ["run", "evaluate", "build_run", "register_method"]

SETTINGS = ("task_il", "class_il")
# keys that may differ between a run and its resumption
_RESUME_FREE = {
    "resume",
    "stop_after_epochs",
    "progress",
    "output_dir",
    "threads",
    "plots",
    "compare_dense",
    "save_checkpoints",
    "tensorboard",
}


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model, scenario: Scenario, trained_upto: int, device, batch_size: int = 256, task_context=None
) -> dict[str, list[float]]:
    """Accuracy (%) on every task's evaluation data, Task-IL and Class-IL.

    Task-IL predicts within the task's own classes.  Class-IL predicts among the classes of all
    tasks seen so far (``0..trained_upto``); for a task not yet trained (``j > trained_upto``,
    used by FWT) the candidates are the classes of tasks ``0..j``.  ``task_context(j)``, if
    given, returns a context manager inside which task ``j`` is evaluated (per-task masks/heads).
    """
    was_training = model.training
    model.eval()
    k = scenario.classes_per_task
    out = {s: [] for s in SETTINGS}
    for j, data in enumerate(scenario.test):
        lo, hi = scenario.task_classes(j)
        hi_c = (max(trained_upto, j) + 1) * k
        correct_t = correct_c = 0
        with task_context(j) if task_context is not None else nullcontext():
            for s in range(0, len(data), batch_size):
                x = scenario.preprocess(data.x[s : s + batch_size], train=False).to(device)
                y = data.y[s : s + batch_size].to(device)
                logits = model(x)
                correct_t += int((logits[:, lo:hi].argmax(1) + lo == y).sum())
                correct_c += int((logits[:, :hi_c].argmax(1) == y).sum())
        n = max(len(data), 1)
        out["task_il"].append(100.0 * correct_t / n)
        out["class_il"].append(100.0 * correct_c / n)
    model.train(was_training)
    return out


# --------------------------------------------------------------------------- set-up
def _check_head(model: torch.nn.Module, scenario: Scenario) -> None:
    """Raise a ``ValueError`` naming ``model`` unless it maps one training example to one logit per class."""
    x = scenario.preprocess(scenario.train[0].x[:1], train=False)
    p = next(model.parameters(), None)
    x = x.to(p.device) if p is not None else x
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's forward gets the same message
        raise ValueError(
            f"model: a forward pass of one training example (input shape {tuple(x.shape)}) failed: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    finally:
        model.train(was_training)
    k, n = scenario.classes_per_task, scenario.n_classes
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, n):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"model: expected logits of shape [N, {n}] (its head must output one value per class: "
            f"{scenario.n_tasks} tasks x {k} classes), got {got} for 1 example"
        )


def build_run(cfg: dict, model: torch.nn.Module | None = None, scenario: Scenario | None = None):
    """(scenario, model, strategy, counter) for a validated configuration; seeds everything first.

    ``model``: the user's own backbone instead of ``cfg["backbone"]`` (trained in place; its
    ``nn.Linear`` / ``nn.Conv2d`` layers become sparse ones when ``sparsity > 0``); ``scenario``:
    the user's own tasks instead of ``cfg["dataset"]`` (see :func:`sparsekern_cl.data.user_scenario`).
    """
    torch.manual_seed(cfg["seed"])
    if scenario is None:
        scenario = _builtin_scenario(cfg)
    torch.manual_seed(cfg["seed"])  # the model's initial weights depend on the seed alone
    if model is None:
        model = build_backbone(
            cfg["backbone"], scenario.input_shape, scenario.n_classes, hidden=cfg["mlp_hidden"], nf=cfg["nf"]
        )
    else:
        _check_head(model, scenario)
    sparsify_from_config(model, cfg)
    device = torch.device(cfg["device"])
    model.to(device)
    method = get_method(cfg["method"])
    strategy = method.strategy(model, scenario, cfg, device, method.make_plugins(cfg, model, scenario))
    counter = FlopCounter(model)
    strategy.flop_counter = counter
    return scenario, model, strategy, counter


def _builtin_scenario(cfg: dict) -> Scenario:
    return build_scenario(
        cfg["dataset"],
        n_tasks=cfg["n_tasks"],
        data_dir=cfg["data_dir"],
        class_order=cfg["class_order"],
        seed=cfg["seed"],
        validation=cfg["validation"],
        split_seed=cfg["split_seed"],
        image_size=cfg["image_size"],
        augment=cfg["augment"],
        synthetic=cfg["synthetic"],
    )


def _concat(tasks: list[TaskData]) -> TaskData:
    if len(tasks) == 1:
        return tasks[0]
    return TaskData(torch.cat([t.x for t in tasks]), torch.cat([t.y for t in tasks]), torch.cat([t.uid for t in tasks]))


def _epoch_order(seed: int, task: int, epoch: int, n: int) -> torch.Tensor:
    # derived from (seed, task, epoch) alone, so a resumed run visits the same order
    g = torch.Generator().manual_seed(seed * 1_000_003 + task * 1009 + epoch)
    return torch.randperm(n, generator=g)


def _environment(model, strategy=None) -> dict:
    runs = provenance.merge_runs(getattr(strategy, "layer_runs", []))
    compute, why = provenance.sparse_compute(runs)
    return {
        "sparsekern": sparsekern.__version__,
        "sparsekern_cl": __version__,
        "python": sys.version.split()[0],
        "torch": str(torch.__version__),  # a plain str: checkpoints load with weights_only=True
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "layer_backends": {n: m.selected_backend() for n, m in sparsekern.sparse_modules(model)},
        "layer_runs": runs,  # what each sparse layer's training calls ran on, "path/backend" (task ends)
        "sparse_compute": compute,  # false: a sparse layer ran dense or on the reference backend
        "not_sparse_compute": why,
        "git": provenance.git_commit(),
        "cpu_isa": provenance.cpu_isa(),
    }


def _progress(cfg, iterable, total, desc, leave=True):
    on = cfg["progress"]
    if on == "auto":
        on = sys.stderr.isatty()
    if not on:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=leave, file=sys.stderr, dynamic_ncols=True)


def _save(path: str, obj) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill during the write leaves the previous checkpoint intact


def load_checkpoint(path: str) -> dict:
    """A run's checkpoint, loaded with ``weights_only=True``: tensors, containers and plain values
    only, so a tampered file cannot run code; a truncated, empty or foreign file raises a
    ``ValueError`` naming it."""
    try:
        ck = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every unreadable file gets the same clear message
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            why = "an empty file"
        elif isinstance(exc, pickle.UnpicklingError):  # torch's text advises weights_only=False: not here
            why = "not a torch file of tensors and plain values"
        else:
            why = f"truncated or corrupt: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise ValueError(f"resume: {path} is not a readable sparsekern_cl checkpoint ({why})") from exc
    if not isinstance(ck, dict) or not {"config", "state", "model", "strategy"} <= set(ck):
        raise ValueError(f"resume: {path} is not a sparsekern_cl checkpoint (missing keys)")
    return ck


# --------------------------------------------------------------------------- one run
def _run_one(cfg: dict, model=None, scenario=None, par=None) -> dict:
    threads = torch.get_num_threads()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    amp = cfg.get("precision", "fp32") == "bf16"
    try:
        # one autocast region around the whole run, so without autocast's cast cache: the cache
        # keeps each parameter's first bf16 copy until the region ends, and every later forward
        # of a dense layer would read the weights of the first step
        dev = torch.device(cfg["device"]).type
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
            return _train(cfg, model, scenario, par)
    finally:
        torch.set_num_threads(threads)  # a run leaves the process as it found it


def _warm_up(model: torch.nn.Module, scenario: Scenario, cfg: dict, device, rows: int = 1) -> None:
    """Untimed: two SGD steps (lr 0) of a throwaway copy of ``model`` at the batch size and at
    ``rows`` times it (a replay strategy's batch with its replay samples appended).

    One-time costs of a process — lazy imports inside ``torch.optim``, oneDNN / MKL primitive
    creation, the kernels' scratch memory, the sparse-vs-dense probe of :mod:`sparsekern.choice` —
    would otherwise land in the first timed epoch, i.e. on whichever run of a ``--compare-dense``
    pair goes first.  Touches no state of the run: the copy is discarded, the inputs are taken
    without augmentation, and the global RNG state is restored.
    """
    task = scenario.train[0]
    sizes = sorted({min(len(task), int(cfg["batch_size"]) * k) for k in {1, max(1, rows)}} - {0})
    if not sizes:
        return
    rng = torch.get_rng_state()
    try:
        twin = copy.deepcopy(model).train()
        opt = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=0.0, momentum=0.9)
        for n in sizes:
            x = scenario.preprocess(task.x[:n], train=False).to(device)
            y = task.y[:n].to(device)
            for _ in range(2):
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(twin(x), y).backward()
                opt.step()
    finally:
        torch.set_rng_state(rng)


def _state_parts(model, strategy) -> dict:
    """What the ranks of a data-parallel run must agree on (what each layer ran on may differ)."""
    s = {k: v for k, v in strategy.state_dict().items() if k != "layer_runs"}
    return {"model": model.state_dict(), "strategy": s, "torch RNG": torch.get_rng_state()}


def _train(cfg: dict, user_model=None, user_scenario=None, par=None) -> dict:
    out_dir = cfg["output_dir"]
    main = par is None or par.is_main  # only rank 0 writes
    ckpt_path = os.path.join(out_dir, "checkpoint.pt") if out_dir and cfg["save_checkpoints"] else None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    if not main:
        cfg = {**cfg, "progress": False}
    scenario, model, strategy, counter = build_run(cfg, user_model, user_scenario)
    strategy.parallel = par
    _warm_up(model, scenario, cfg, strategy.device, strategy.forward_rows_per_example())
    user = _user_tag(user_model, user_scenario, scenario)
    T = scenario.n_tasks
    epochs = cfg["epochs"]
    state = {
        "task": 0,
        "epoch": 0,
        "rows": {s: [] for s in SETTINGS},
        "init_acc": None,
        "task_flops": [],
        "task_dense_flops": [],
        "task_time": [],
        "epoch_time": [[] for _ in range(T)],
        "eval_time": 0.0,
        "finished": False,
        "results": None,
    }

    if cfg["resume"] and ckpt_path and os.path.isfile(ckpt_path):
        ck = load_checkpoint(ckpt_path)
        # a checkpoint from before the precision key ran in fp32
        a = {k: v for k, v in {"precision": "fp32", **ck["config"]}.items() if k not in _RESUME_FREE}
        b = {k: v for k, v in cfg.items() if k not in _RESUME_FREE}
        if a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ValueError(f"resume: the checkpoint in {out_dir} was made with a different configuration ({diff})")
        if ck.get("user") != user:
            raise ValueError(
                f"resume: the checkpoint in {out_dir} was made with another model or scenario ({ck.get('user')})"
            )
        if ck["state"]["finished"]:
            return ck["state"]["results"]
        model.load_state_dict(ck["model"])
        strategy.load_state_dict(ck["strategy"])
        counter.load_snapshot(ck["counter"])
        torch.set_rng_state(ck["torch_rng"])
        state = ck["state"]
    log = RunLog(out_dir if main else None, append=cfg["resume"], tensorboard=cfg["tensorboard"])

    def checkpoint():
        if ckpt_path and main:
            _save(
                ckpt_path,
                {
                    "config": cfg,
                    "state": state,
                    "model": model.state_dict(),
                    "strategy": strategy.state_dict(),
                    "counter": counter.snapshot(),
                    "torch_rng": torch.get_rng_state(),
                    "user": user,
                },
            )

    if state["init_acc"] is None:
        state["init_acc"] = evaluate(
            model, scenario, -1, strategy.device, cfg["eval_batch_size"], task_context=strategy.eval_task
        )

    epochs_run = 0
    stopped = False
    diverged = None
    tasks_iter = _progress(cfg, range(state["task"], T), T - state["task"], "tasks")
    for t in tasks_iter:
        data = _concat([scenario.train[i] for i in strategy.training_tasks(t)])
        if state["epoch"] == 0:
            flops0, dflops0 = counter.total, counter.dense_total
            state["task_start_flops"] = (flops0, dflops0)
            state["task_time_acc"] = 0.0
            strategy.begin_task(t)
        for epoch in range(state["epoch"], epochs):
            idx = strategy.train_indices(t, epoch, len(data))
            order = idx[_epoch_order(cfg["seed"], t, epoch, len(idx))]
            bs = cfg["batch_size"]
            batches = [order[s : s + bs] for s in range(0, len(order), bs)]
            model.train()
            loss = float("nan")
            counter.active = True
            t0 = time.perf_counter()
            for step, b in enumerate(_progress(cfg, batches, len(batches), f"task {t} epoch {epoch}", leave=False)):
                x_raw = data.x[b]
                loss = strategy.observe(strategy.transform(x_raw), x_raw, data.y[b].to(strategy.device), t, data.uid[b])
                if not math.isfinite(loss):
                    diverged = {"task": t, "epoch": epoch, "step": step, "reason": f"the training loss is {loss}"}
                    break
            if diverged is None:
                strategy.end_epoch(t, epoch)
                diverged = _nonfinite_weights(model, t, epoch, len(batches))
            counter.active = False
            if par is not None and diverged is None:
                par.check_consistent(f"task {t} epoch {epoch + 1}", _state_parts(model, strategy))
            if diverged is not None:  # the last checkpoint stays as it was: nothing is lost
                log.diverged(t, epoch + 1, loss)
                break
            dt = time.perf_counter() - t0
            state["epoch_time"][t].append(dt)
            state["task_time_acc"] += dt
            state["epoch"] = epoch + 1
            epochs_run += 1
            log.epoch(t, epoch + 1, loss, dt, t * epochs + epoch + 1)
            last_epoch = epoch + 1 == epochs
            if cfg["stop_after_epochs"] and epochs_run >= cfg["stop_after_epochs"]:
                stopped = True
            if not last_epoch and (stopped or (cfg["checkpoint_every"] and (epoch + 1) % cfg["checkpoint_every"] == 0)):
                checkpoint()
            if stopped and not last_epoch:
                break
        if diverged is not None or (stopped and state["epoch"] < epochs):
            break
        strategy.note_layer_runs()  # before end_task's own passes: what training ran on
        counter.active = True
        t0 = time.perf_counter()
        strategy.end_task(t)
        counter.active = False
        state["task_time_acc"] += time.perf_counter() - t0
        state["task_time"].append(state["task_time_acc"])
        f0, d0 = state["task_start_flops"]
        state["task_flops"].append(counter.total - f0)
        state["task_dense_flops"].append(counter.dense_total - d0)
        if par is not None:
            par.check_consistent(f"the end of task {t}", _state_parts(model, strategy))
        t0 = time.perf_counter()
        acc = evaluate(model, scenario, t, strategy.device, cfg["eval_batch_size"], task_context=strategy.eval_task)
        state["eval_time"] += time.perf_counter() - t0
        for s in SETTINGS:
            state["rows"][s].append(acc[s])
        log.task_end(t, epochs, state["rows"])
        state["task"], state["epoch"] = t + 1, 0
        if t + 1 < T:
            checkpoint()
        if stopped:
            break

    log.close()
    results = _results(cfg, scenario, model, strategy, counter, state)
    if user_model is not None:
        results["user_model"] = type(model).__qualname__
    if diverged is not None:
        results["complete"] = False
        results["diverged"] = diverged
    if par is not None:
        results["data_parallel"] = {
            "world_size": par.world_size,
            "rank": par.rank,
            "backend": str(torch.distributed.get_backend(par.group)),
            "consistency_checks": par.checks,
        }
    if results["complete"]:
        state["finished"], state["results"] = True, results
        checkpoint()
    if out_dir and main:
        _write_outputs(results, out_dir, cfg["plots"])
    return results


def _user_tag(user_model, user_scenario, scenario: Scenario) -> dict | None:
    """What a resumed run must match beyond the configuration: the user's model class and data sizes."""
    if user_model is None and user_scenario is None:
        return None
    return {
        "model": type(user_model).__qualname__ if user_model is not None else None,
        "scenario": None
        if user_scenario is None
        else [scenario.name, scenario.class_order, [len(d) for d in scenario.train], list(scenario.input_shape)],
    }


def _nonfinite_weights(model, task: int, epoch: int, steps: int) -> dict | None:
    """The divergence record of a model with a NaN / Inf parameter (one pass over the weights)."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            return {"task": task, "epoch": epoch, "step": steps - 1, "reason": f"parameter {name} is not finite"}
    return None


FWT_MULTIHEAD = (
    "FWT is not defined for multi-head training: before task j is trained its head rows are untrained, so "
    "R[j-1][j] reads an untrained head, and the random-init reference b[j] reads a network (for DST, a mask) "
    "the run discards"
)


def _results(cfg, scenario, model, strategy, counter, state) -> dict:
    T = scenario.n_tasks
    complete = len(state["rows"]["task_il"]) == T
    res = {
        "config": cfg,
        "complete": complete,
        "tasks_done": len(state["rows"]["task_il"]),
        "environment": _environment(model, strategy),
        "scenario": {
            "dataset": scenario.name,
            "source": scenario.source,
            "n_tasks": T,
            "classes_per_task": scenario.classes_per_task,
            "class_order": scenario.class_order,
            "eval_split": scenario.eval_split,
            "train_sizes": [len(d) for d in scenario.train],
            "eval_sizes": [len(d) for d in scenario.test],
        },
        "acc_matrix": {s: state["rows"][s] for s in SETTINGS},
        "random_init_acc": state["init_acc"],
        "train_flops": counter.total,
        "dense_train_flops": counter.dense_total,
        "flops_breakdown": {"counted": dict(counter.totals), "dense": dict(counter.dense_totals)},
        "flops_per_task": state["task_flops"],
        "dense_flops_per_task": state["task_dense_flops"],
        "wall_clock_s": sum(state["task_time"])
        + (0.0 if complete else sum(state["epoch_time"][len(state["task_time"])])),
        "task_wall_clock_s": state["task_time"],
        "epoch_wall_clock_s": state["epoch_time"],
        "eval_wall_clock_s": state["eval_time"],
    }
    lay = layer_densities(model)
    total_w = sum(m.weight.numel() for n, m in model.named_modules() if n in lay)
    kept = sum(lay[n]["weight"] * m.weight.numel() for n, m in model.named_modules() if n in lay)
    sparsity = 1.0 - kept / total_w
    res["layers"] = lay
    res["model_sparsity"] = sparsity
    res["model_capacity"] = (
        model_capacity(min(max(sparsity, 0.0), 1 - 1e-12), strategy.n_stored_masks()) + strategy.extra_capacity()
    )
    report = strategy.method_report()
    if report:
        res["method_report"] = report
    rows = cfg["batch_size"] * strategy.forward_rows_per_example()
    res["memory_footprint"] = memory_footprint(model, scenario.input_shape, rows)
    if complete:
        for s in SETTINGS:
            m = summarize(state["rows"][s], state["init_acc"][s])
            for key in ("avg_acc", "bwt", "fwt", "forgetting", "avg_acc_curve"):
                res.setdefault(key, {})[s] = m[key]
        if strategy.multihead:
            res["fwt"] = dict.fromkeys(SETTINGS)
            res["fwt_undefined"] = FWT_MULTIHEAD
    return res


def _write_outputs(results: dict, out_dir: str, plots: bool) -> None:
    if plots and results["complete"]:
        from .plots import write_plots

        results["plots"] = write_plots(results, out_dir)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


def _check_device(device: str) -> None:
    """Raise a ``ValueError`` naming ``device`` when this machine cannot run on it."""
    dev = torch.device(device)  # the syntax is checked with the configuration
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} needs CUDA, which is not available here (torch {torch.__version__})")
    try:
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as exc:
        raise ValueError(f"device: {device!r} is not usable here ({str(exc).splitlines()[0]})") from exc


# --------------------------------------------------------------------------- public entry
def _user_inputs(model, scenario):
    if model is not None and not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if scenario is None or isinstance(scenario, Scenario):
        return model, scenario
    if isinstance(scenario, dict) and {"train", "test"} <= set(scenario) <= {"train", "test", "name"}:
        return model, user_scenario(scenario["train"], scenario["test"], name=scenario.get("name", "custom"))
    raise ValueError(
        "scenario: expected a sparsekern_cl.Scenario or a dict {'train': [...], 'test': [...]} of one (x, y) "
        f"pair or Dataset per task, got {scenario!r:.80}"
    )


def run(config: dict | None = None, *, model=None, scenario=None, **overrides) -> dict:
    """Run one continual-learning experiment and return its results.

    Args:
        config: a dict of configuration keys (the CLI flags, e.g. ``{"method": "derpp",
            "dataset": "mnist", "sparsity": 0.9}``); ``preset`` and ``config`` (a file) are
            accepted as in the CLI.  ``overrides``: more keys, taking precedence.
        model: your own backbone (an ``nn.Module``) instead of the ``backbone`` key.  It is trained
            in place; with ``sparsity > 0`` its ``nn.Linear`` / ``nn.Conv2d`` layers become sparse
            ones (``keep_dense: auto`` keeps its last ``nn.Linear``, the classifier, dense).  Its
            output must have one logit per class of all tasks (checked on one example).
        scenario: your own tasks instead of the ``dataset`` key: ``{"train": [...], "test": [...]}``
            with one ``(x, y)`` pair of tensors or one ``torch.utils.data.Dataset`` per task (see
            :func:`sparsekern_cl.data.user_scenario`), or a :class:`sparsekern_cl.Scenario`.

    Returns:
        A dict with ``acc_matrix`` (``{"task_il": R, "class_il": R}``, percent), ``avg_acc``,
        ``bwt``, ``fwt``, ``forgetting`` (each per setting), ``train_flops``,
        ``dense_train_flops``, ``wall_clock_s`` (training time), memory footprint, model capacity,
        per-task and per-epoch timings, the configuration and the environment.  With
        ``compare_dense`` the dense run's figures are under ``dense_reference`` and the measured
        ``wall_clock_ratio`` (dense / sparse training time) beside them.

    Raises:
        ValueError: a configuration value is invalid, the device is not available here,
            ``output_dir`` is a file or the checkpoint to resume is unreadable (the message names
            the key), or ``model`` / ``scenario`` do not fit (the message names the argument, e.g.
            ``train[2]``).

    Under ``torchrun`` the run is data-parallel (see :mod:`sparsekern_cl.parallel`): ``batch_size``
    is the global batch, every rank returns the same results (``data_parallel`` names the rank)
    and only rank 0 writes.

    With ``output_dir`` the run writes ``log.csv`` as it goes (one row per epoch and per task end,
    see :class:`sparsekern_cl.logs.RunLog`), and TensorBoard scalars with ``tensorboard: true``.

    A run whose loss or weights become NaN / Inf stops there: its results have
    ``complete: false`` and ``diverged`` (``task``, ``epoch``, ``step``, ``reason``), and the
    last checkpoint is left as it was.

    Example:
        >>> res = sparsekern_cl.run({"method": "er", "dataset": "mnist", "buffer_size": 200})
        >>> res["avg_acc"]["class_il"]
    """
    cfg = resolve_config({**(config or {}), **overrides})
    model, scenario = _user_inputs(model, scenario)
    _check_device(cfg["device"])
    if cfg["output_dir"] and os.path.exists(cfg["output_dir"]) and not os.path.isdir(cfg["output_dir"]):
        raise ValueError(f"output_dir: expected a folder, got the file {cfg['output_dir']!r}")
    par = parallel.setup(cfg["device"])
    try:
        results = _run(cfg, model, scenario, par)
        if par is not None:
            par.barrier()  # rank 0's files are complete when any rank returns
        return results
    finally:
        if par is not None:
            par.close()


def _run(cfg: dict, model, scenario, par) -> dict:
    if not cfg["compare_dense"]:
        return _run_one(cfg, model, scenario, par)
    out = cfg["output_dir"]
    dense_cfg = {
        **cfg,
        "sparsity": 0.0,
        "compare_dense": False,
        "output_dir": os.path.join(out, "dense") if out else None,
    }
    sparse_cfg = {**cfg, "compare_dense": False, "output_dir": os.path.join(out, "sparse") if out else None}
    dense = _run_one(dense_cfg, copy.deepcopy(model), scenario, par)  # the user's module itself is the sparse run's
    if not dense["complete"]:
        return {**dense, "compare_stage": "dense"}
    results = _run_one(sparse_cfg, model, scenario, par)
    if not results["complete"]:
        return {**results, "compare_stage": "sparse"}
    keys = (
        "acc_matrix",
        "avg_acc",
        "bwt",
        "fwt",
        "forgetting",
        "train_flops",
        "dense_train_flops",
        "wall_clock_s",
        "task_wall_clock_s",
        "epoch_wall_clock_s",
        "memory_footprint",
        "model_capacity",
        "environment",
    )
    results = dict(results)
    results["config"] = cfg
    results["dense_reference"] = {k: dense[k] for k in keys}
    results["wall_clock_ratio"] = dense["wall_clock_s"] / results["wall_clock_s"]
    if out and (par is None or par.is_main):
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results
