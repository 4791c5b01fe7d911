"""Run configuration: defaults, presets, config files, command-line flags, validation.

A configuration is a flat dict.  Its keys are the command-line flags (``batch_size`` is
``--batch-size``) and the keys of a YAML or JSON config file.  Precedence, lowest first: the
defaults, a preset (``preset``), a config file (``config``), explicit keys (flags, or the dict
handed to :func:`sparsekern_cl.run`).
"""

from __future__ import annotations

import argparse
import json
import math
import os

from .backbones import BACKBONES
from .data import DATASETS

__all__ = ["DEFAULTS", "PRESETS", "HELP", "resolve_config", "validate_config", "load_config_file",
           "build_parser", "register_config_keys"]

DEFAULTS: dict = {
    # what to run
    "method": "derpp",
    "dataset": "mnist",
    "data_dir": None,
    "n_tasks": 5,
    "class_order": "fixed",
    "validation": 0.0,
    "split_seed": 0,
    "augment": None,
    # model
    "backbone": "mlp",
    "mlp_hidden": [100, 100],
    "nf": 20,
    "head": "single",
    # sparsity of the backbone
    "sparsity": 0.0,
    "sparse_distribution": "uniform",
    "sparse_init": "magnitude",
    "sparse_rescale": True,
    "layout": "unstructured",
    "block_size": None,
    "backend": None,
    "keep_dense": "auto",
    # training
    "epochs": 1,
    "batch_size": 10,
    "minibatch_size": None,
    "eval_batch_size": 256,
    "optimizer": "sgd",
    "lr": 0.1,
    "momentum": 0.0,
    "weight_decay": 0.0,
    "buffer_size": 200,
    "alpha": 0.3,
    "beta": 0.5,
    "ewc_lambda": 10.0,
    "ewc_gamma": 1.0,
    "ewc_fisher_samples": 0,
    # running
    "seed": 0,
    "threads": None,
    "device": "cpu",
    "output_dir": None,
    "checkpoint_every": 0,
    "save_checkpoints": True,
    "resume": False,
    "stop_after_epochs": None,
    "compare_dense": False,
    "plots": True,
    "progress": "auto",
    "synthetic": None,
}

HELP: dict = {
    "method": "strategy: finetune, joint, er, derpp, ewc (and any registered sparse method)",
    "dataset": f"one of {', '.join(DATASETS)}",
    "data_dir": "folder of a real dataset (cifar10, cifar100, tinyimagenet, miniimagenet)",
    "n_tasks": "number of tasks (must divide the number of classes)",
    "class_order": "fixed, seeded, or a JSON list of class ids",
    "validation": "fraction of each class's training data held out as the evaluation set (0: test set)",
    "split_seed": "seed of the validation split",
    "augment": "random crop+flip for training (default: on for natural images, off for digits)",
    "backbone": f"one of {', '.join(BACKBONES)}",
    "mlp_hidden": "hidden widths of the MLP, e.g. [100,100]",
    "nf": "ResNet-18 width (20 reduced, 64 full)",
    "head": "single (one head over all classes) or multi (each task's logits trained as its own head)",
    "sparsity": "fraction of zero weights in the sparse layers (0: a dense model of plain PyTorch layers)",
    "sparse_distribution": "uniform or erk",
    "sparse_init": "magnitude, random or global_magnitude",
    "sparse_rescale": "scale each sparse layer's kept initial weights so its output variance matches the dense init",
    "layout": "unstructured or block",
    "block_size": "block size for layout=block",
    "backend": "force a sparsekern backend (cpp, reference, triton, cuda); default automatic",
    "keep_dense": "'auto' or a JSON list of layer names kept dense",
    "epochs": "epochs per task",
    "batch_size": "batch size of the current task's data",
    "minibatch_size": "replay batch size (default: batch_size)",
    "buffer_size": "replay buffer capacity (er, derpp)",
    "alpha": "DER++ weight of the logit-matching term",
    "beta": "DER++ weight of the replayed cross-entropy",
    "ewc_lambda": "EWC penalty strength",
    "ewc_gamma": "online-EWC decay of the running Fisher",
    "ewc_fisher_samples": "examples used for the Fisher estimate (0: all of the task)",
    "seed": "seed: a CPU run is repeatable bit for bit with the same seed and thread count",
    "threads": "torch CPU threads (default: torch's)",
    "output_dir": "where results.json, plots and checkpoints go (default: no files)",
    "checkpoint_every": "also checkpoint every N epochs (0: only at task ends)",
    "save_checkpoints": "write output_dir/checkpoint.pt (at task ends, every checkpoint_every epochs, at the end)",
    "resume": "continue from output_dir/checkpoint.pt",
    "stop_after_epochs": "stop after this many epochs in this process (for time-limited jobs; resume later)",
    "compare_dense": "also run the same configuration dense and report the wall-clock ratio",
    "plots": "write the accuracy-matrix and accuracy-over-time plots",
    "progress": "progress bars: auto, true, false",
}

PRESETS: dict[str, dict] = {
    # DER++ on the embedded MNIST subset, dense against 90 % sparse: the README's main job
    "demo": {
        "method": "derpp", "dataset": "mnist", "n_tasks": 5, "backbone": "mlp", "mlp_hidden": [1000, 1000],
        "sparsity": 0.9, "compare_dense": True, "epochs": 1, "batch_size": 32, "buffer_size": 500,
        "lr": 0.2, "alpha": 0.3, "beta": 0.5, "output_dir": "runs/demo",
    },
    # the benchmark table's setting: MNIST subset, MLP 2x100, 1 epoch per task (mammoth's seq-MNIST)
    "mnist-mlp": {"dataset": "mnist", "n_tasks": 5, "backbone": "mlp", "mlp_hidden": [100, 100], "epochs": 1,
                  "batch_size": 10},
    "cifar10": {"dataset": "cifar10", "n_tasks": 5, "backbone": "resnet18", "nf": 64, "epochs": 50,
                "batch_size": 32, "lr": 0.03},
    "cifar100": {"dataset": "cifar100", "n_tasks": 10, "backbone": "resnet18", "nf": 64, "epochs": 50,
                 "batch_size": 32, "lr": 0.03},
    "tinyimagenet": {"dataset": "tinyimagenet", "n_tasks": 10, "backbone": "resnet18", "nf": 64, "epochs": 100,
                     "batch_size": 32, "lr": 0.03},
    "miniimagenet": {"dataset": "miniimagenet", "n_tasks": 10, "backbone": "resnet18", "nf": 20, "epochs": 50,
                     "batch_size": 32, "lr": 0.03},
}

# keys added by methods registered later (e.g. sparse CL methods), with their defaults
_EXTRA_KEYS: dict = {}


def register_config_keys(defaults: dict, help: dict | None = None) -> None:
    """Add configuration keys (with defaults) for a method defined outside this module."""
    for k, v in defaults.items():
        if k in DEFAULTS:
            raise ValueError(f"register_config_keys: {k!r} is already a configuration key")
        _EXTRA_KEYS[k] = v
    HELP.update(help or {})


def all_defaults() -> dict:
    d = dict(DEFAULTS)
    d.update(_EXTRA_KEYS)
    return d


# --------------------------------------------------------------------------- files
def _parse_scalar(text: str):
    t = text.strip()
    if t == "" or t in ("null", "~", "None"):
        return None
    if t in ("true", "True", "yes"):
        return True
    if t in ("false", "False", "no"):
        return False
    if (t.startswith('"') and t.endswith('"')) or (t.startswith("'") and t.endswith("'")):
        return t[1:-1]
    if t.startswith("["):
        try:
            return json.loads(t)
        except json.JSONDecodeError:
            inner = t.strip("[]")
            return [_parse_scalar(p) for p in inner.split(",") if p.strip()]
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t


def _parse_flat_yaml(text: str, path: str) -> dict:
    """A flat ``key: value`` YAML mapping (what config files here use), for when PyYAML is absent."""
    out = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.split(" #")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if not s.strip():
            continue
        if line[0].isspace() or ":" not in s:
            raise ValueError(f"{path}:{lineno}: expected a flat 'key: value' line (install PyYAML for nested YAML)")
        key, _, value = s.partition(":")
        out[key.strip()] = _parse_scalar(value)
    return out


def load_config_file(path: str) -> dict:
    """Read a ``.json``, ``.yaml`` or ``.yml`` config file into a dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config: no file at {path!r}")
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config: {path} is not valid JSON ({exc})") from exc
    elif path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            data = _parse_flat_yaml(text, path)
        else:
            data = yaml.safe_load(text) or {}
    else:
        raise ValueError(f"config: expected a .json, .yaml or .yml file, got {path!r}")
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- resolution
def resolve_config(config: dict | None = None) -> dict:
    """Defaults < preset < config file < ``config``'s own keys; returns the validated dict."""
    config = dict(config or {})
    preset = config.pop("preset", None)
    path = config.pop("config", None)
    merged = all_defaults()
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
        merged.update(PRESETS[preset])
    if path is not None:
        file_cfg = load_config_file(path)
        file_cfg.pop("config", None)
        fp = file_cfg.pop("preset", None)
        if fp is not None:
            if fp not in PRESETS:
                raise ValueError(f"preset (in {path}): expected one of {sorted(PRESETS)}, got {fp!r}")
            merged.update(PRESETS[fp])
        unknown = sorted(set(file_cfg) - set(merged))
        if unknown:
            raise ValueError(f"config file {path}: unknown keys {unknown}")
        merged.update(file_cfg)
    unknown = sorted(set(config) - set(merged))
    if unknown:
        raise ValueError(f"config: unknown keys {unknown}; known keys are {sorted(merged)}")
    merged.update(config)
    return validate_config(merged)


def _fail(key, expected, value):
    raise ValueError(f"{key}: expected {expected}, got {value!r}")


def _int(cfg, key, lo=None, allow_none=False):
    v = cfg[key]
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
        _fail(key, f"an integer >= {lo}" if lo is not None else "an integer", v)


def _num(cfg, key, lo=None, hi=None, lo_open=False, hi_open=False):
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        _fail(key, "a number", v)
    bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi))
    if bad:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        _fail(key, f"a number in {lb}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{rb}", v)
    cfg[key] = float(v)


def _choice(cfg, key, choices):
    if cfg[key] not in choices:
        _fail(key, f"one of {tuple(choices)}", cfg[key])


def _bool(cfg, key):
    if not isinstance(cfg[key], bool):
        _fail(key, "true or false", cfg[key])


def validate_config(cfg: dict) -> dict:
    """Check every key; raise ``ValueError`` naming the key and what it expects."""
    from .strategies import STRATEGIES

    cfg = dict(cfg)
    _choice(cfg, "method", sorted(STRATEGIES))
    _choice(cfg, "dataset", DATASETS)
    if cfg["data_dir"] is not None and not isinstance(cfg["data_dir"], str):
        _fail("data_dir", "a folder path", cfg["data_dir"])
    _int(cfg, "n_tasks", 1)
    co = cfg["class_order"]
    if not (co in ("fixed", "seeded") or (isinstance(co, list) and all(isinstance(c, int) for c in co))):
        _fail("class_order", "'fixed', 'seeded' or a list of class ids", co)
    _num(cfg, "validation", 0.0, 1.0, hi_open=True)
    _int(cfg, "split_seed", 0)
    if cfg["augment"] is not None:
        _bool(cfg, "augment")
    _choice(cfg, "backbone", BACKBONES)
    mh = cfg["mlp_hidden"]
    if isinstance(mh, int) and not isinstance(mh, bool):
        cfg["mlp_hidden"] = mh = [mh]
    if not isinstance(mh, list) or not mh or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in mh):
        _fail("mlp_hidden", "a non-empty list of positive integers", mh)
    _int(cfg, "nf", 1)
    _choice(cfg, "head", ("single", "multi"))
    _num(cfg, "sparsity", 0.0, 1.0, hi_open=True)
    _choice(cfg, "sparse_distribution", ("uniform", "erk"))
    _choice(cfg, "sparse_init", ("magnitude", "random", "global_magnitude"))
    _bool(cfg, "sparse_rescale")
    _choice(cfg, "layout", ("unstructured", "block"))
    if cfg["layout"] == "block":
        bs = cfg["block_size"]
        ok = (isinstance(bs, int) and not isinstance(bs, bool) and bs > 0) or (
            isinstance(bs, list) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs))
        if not ok:
            _fail("block_size", "a positive integer or [bo, bk] when layout is 'block'", bs)
    if cfg["backend"] is not None:
        _choice(cfg, "backend", ("triton", "cuda", "cpp", "reference"))
    kd = cfg["keep_dense"]
    if not (kd == "auto" or (isinstance(kd, list) and all(isinstance(n, str) for n in kd))):
        _fail("keep_dense", "'auto' or a list of layer names", kd)
    _int(cfg, "epochs", 1)
    _int(cfg, "batch_size", 1)
    _int(cfg, "minibatch_size", 1, allow_none=True)
    _int(cfg, "eval_batch_size", 1)
    _choice(cfg, "optimizer", ("sgd", "adam"))
    _num(cfg, "lr", 0.0, lo_open=True)
    _num(cfg, "momentum", 0.0, 1.0, hi_open=True)
    _num(cfg, "weight_decay", 0.0)
    _int(cfg, "buffer_size", 0)
    if cfg["method"] in ("er", "derpp") and cfg["buffer_size"] == 0:
        _fail("buffer_size", f"a positive capacity for method {cfg['method']!r}", 0)
    _num(cfg, "alpha", 0.0)
    _num(cfg, "beta", 0.0)
    _num(cfg, "ewc_lambda", 0.0)
    _num(cfg, "ewc_gamma", 0.0, 1.0)
    _int(cfg, "ewc_fisher_samples", 0)
    _int(cfg, "seed", 0)
    _int(cfg, "threads", 1, allow_none=True)
    if not isinstance(cfg["device"], str):
        _fail("device", "a device string such as 'cpu' or 'cuda'", cfg["device"])
    if cfg["output_dir"] is not None and not isinstance(cfg["output_dir"], str):
        _fail("output_dir", "a folder path", cfg["output_dir"])
    _int(cfg, "checkpoint_every", 0)
    _bool(cfg, "save_checkpoints")
    _bool(cfg, "resume")
    if cfg["resume"] and not cfg["output_dir"]:
        _fail("resume", "an output_dir to resume from (resume=true needs output_dir)", cfg["resume"])
    _int(cfg, "stop_after_epochs", 1, allow_none=True)
    _bool(cfg, "compare_dense")
    if cfg["compare_dense"] and cfg["sparsity"] == 0:
        _fail("compare_dense", "a sparse run to compare (set sparsity > 0)", True)
    _bool(cfg, "plots")
    if cfg["progress"] not in ("auto", True, False):
        _fail("progress", "'auto', true or false", cfg["progress"])
    if cfg["synthetic"] is not None and not isinstance(cfg["synthetic"], dict):
        _fail("synthetic", "a mapping of synthetic-data options", cfg["synthetic"])
    return cfg


# --------------------------------------------------------------------------- command line
def _cli_value(text: str):
    """A flag's value: JSON when it parses (numbers, lists, true/false/null), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return _parse_scalar(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sparsekern_cl",
        description="Continual learning on sparse compute. Every configuration key is a flag; values are JSON "
                    "where that parses (numbers, true/false, null, [lists]), strings otherwise.",
    )
    p.add_argument("--config", help="a YAML or JSON file of configuration keys")
    p.add_argument("--preset", help=f"a named configuration: {', '.join(sorted(PRESETS))}")
    for key, default in all_defaults().items():
        flag = "--" + key.replace("_", "-")
        extra = {"nargs": "?", "const": True} if isinstance(default, bool) else {}  # `--resume` alone means true
        p.add_argument(flag, dest=key, type=_cli_value, default=argparse.SUPPRESS, metavar="V",
                       help=f"{HELP.get(key, '')} (default: {json.dumps(default)})", **extra)
    return p
