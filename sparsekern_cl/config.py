"""Run configuration: defaults, presets, config files, command-line flags, validation.

A configuration is a flat dict.  Its keys are the command-line flags (``batch_size`` is
``--batch-size``) and the keys of a YAML or JSON config file.  Precedence, lowest first: the
defaults, a preset (``preset``), a config file (``config``), explicit keys (flags, or the dict
handed to :func:`sparsekern_cl.run`).

The keys are declared as fields of group dataclasses: the core groups here (:class:`CoreConfig`,
:class:`DataConfig`, :class:`ModelConfig`, :class:`SparsityConfig`) and each method's groups in
:mod:`sparsekern_cl.registry`.  ``DEFAULTS``, ``HELP`` and ``PRESETS`` are read-only views of them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from . import registry
from .backbones import BACKBONES
from .data import DATASETS
from .options import (
    check_value,
    choice,
    custom,
    fail,
    flag,
    group_defaults,
    group_fields,
    group_title,
    integer,
    number,
    text,
    unchecked,
)

__all__ = [
    "DEFAULTS",
    "PRESETS",
    "HELP",
    "CORE_GROUPS",
    "CORE_PRESETS",
    "CLI_ALIASES",
    "CoreConfig",
    "DataConfig",
    "ModelConfig",
    "SparsityConfig",
    "resolve_config",
    "validate_config",
    "load_config_file",
    "build_parser",
    "register_config_keys",
    "config_groups",
    "all_defaults",
]


# --------------------------------------------------------------------------- core groups
def _class_order(key, v):
    if not (v in ("fixed", "seeded") or (isinstance(v, list) and all(isinstance(c, int) for c in v))):
        fail(key, "'fixed', 'seeded' or a list of class ids", v)
    return v


def _mlp_hidden(key, v):
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in v):
        fail(key, "a non-empty list of positive integers", v)
    return v


def _keep_dense(key, v):
    if not (v == "auto" or (isinstance(v, list) and all(isinstance(n, str) for n in v))):
        fail(key, "'auto' or a list of layer names", v)
    return v


def _mapping(key, v):
    if v is not None and not isinstance(v, dict):
        fail(key, "a mapping of synthetic-data options", v)
    return v


_DEVICE_EXPECTED = "a torch device string such as 'cpu', 'cuda' or 'cuda:1'"


def _device(key, v):
    import torch

    try:
        torch.device(v)
    except (RuntimeError, TypeError, ValueError):
        fail(key, _DEVICE_EXPECTED, v)
    return v


def _method_names() -> list[str]:
    return registry.method_names()


@dataclass(frozen=True)
class CoreConfig:
    """core: the method, training and running"""

    method: str = choice("derpp", "the method (each group below lists the methods using its keys)", _method_names)
    epochs: int = integer(1, "epochs per task", min=1)
    batch_size: int = integer(10, "batch size of the current task's data", min=1)
    eval_batch_size: int = integer(256, "batch size of the evaluation passes", min=1)
    optimizer: str = choice("sgd", "sgd or adam", ("sgd", "adam"))
    lr: float = number(0.1, "learning rate", "(0, inf)")
    momentum: float = number(0.0, "SGD momentum", "[0, 1)")
    sparse_optimizer: bool = flag(
        True,
        "step the weights of sparse layers on their gradient mask only (sparsekern.optim: compact state; "
        "frozen and pruned weights never move); false: the stock torch.optim step over every entry",
    )
    compact_grads: bool = flag(
        True,
        "with sparse_optimizer: sparse layers' backward writes the weight gradient on the gradient mask only "
        "(no dense dW; same weights bit for bit) unless the method reads weight.grad (SparCL, EsaCL, EWC)",
    )
    weight_decay: float = number(0.0, "weight decay", "[0, inf)")
    seed: int = integer(0, "seed: a CPU run is repeatable bit for bit with the same seed and thread count", min=0)
    threads: int | None = integer(None, "torch CPU threads (default: torch's)", min=1, nullable=True)
    precision: str = choice(
        "fp32",
        "bf16: every forward pass (training, replay, evaluation) under torch.autocast(device, bfloat16) with "
        "fp32 master weights, as for nn.Linear / nn.Conv2d; the sparse layers run their bf16 kernels "
        "(and the compare_dense run its dense bf16: the fastest dense on CPUs with AVX512-BF16 or AMX)",
        ("fp32", "bf16"),
    )
    device: str = custom("cpu", "torch device of the run", _device, _DEVICE_EXPECTED)
    output_dir: str | None = text(
        None, "where results.json, plots and checkpoints go (default: no files)", "a folder path", nullable=True
    )
    checkpoint_every: int = integer(0, "also checkpoint every N epochs (0: only at task ends)", min=0)
    save_checkpoints: bool = flag(
        True, "write output_dir/checkpoint.pt (at task ends, every checkpoint_every epochs, at the end)"
    )
    resume: bool = flag(False, "continue from output_dir/checkpoint.pt")
    stop_after_epochs: int | None = integer(
        None, "stop after this many epochs in this process (for time-limited jobs; resume later)", min=1, nullable=True
    )
    compare_dense: bool = flag(False, "also run the same configuration dense and report the wall-clock ratio")
    plots: bool = flag(True, "write the accuracy-matrix and accuracy-over-time plots")
    tensorboard: bool = flag(
        False, "also write TensorBoard scalars to output_dir/tensorboard (when torch.utils.tensorboard imports)"
    )
    progress: str | bool = choice(
        "auto", "progress bars: auto, true, false", ("auto", True, False), expected="'auto', true or false"
    )

    @staticmethod
    def check(cfg: dict) -> None:
        """Rules across keys of the group."""
        if cfg["resume"] and not cfg["output_dir"]:
            fail("resume", "an output_dir to resume from (resume=true needs output_dir)", cfg["resume"])
        if cfg["compare_dense"] and cfg["sparsity"] == 0:
            fail("compare_dense", "a sparse run to compare (set sparsity > 0)", True)
        if cfg["tensorboard"] and not cfg["output_dir"]:
            fail("tensorboard", "an output_dir to write to (tensorboard=true needs output_dir)", True)


@dataclass(frozen=True)
class DataConfig:
    """data: the dataset and how it is split into tasks"""

    dataset: str = choice("mnist", f"one of {', '.join(DATASETS)}", DATASETS)
    data_dir: str | None = text(
        None, "folder of a real dataset (cifar10, cifar100, tinyimagenet, miniimagenet)", "a folder path", nullable=True
    )
    n_tasks: int = integer(5, "number of tasks (must divide the number of classes)", min=1)
    class_order: str | list = custom(
        "fixed", "fixed, seeded, or a JSON list of class ids", _class_order, "'fixed', 'seeded' or a list of class ids"
    )
    validation: float = number(
        0.0, "fraction of each class's training data held out as the evaluation set (0: test set)", "[0, 1)"
    )
    split_seed: int = integer(0, "seed of the validation split", min=0)
    image_size: int | None = integer(
        None, "resize every image to this square size (bilinear; e.g. 32 for MNIST on ResNet-18)", min=1, nullable=True
    )
    augment: bool | None = flag(
        None, "random crop+flip for training (default: on for natural images, off for digits)", nullable=True
    )
    synthetic: dict | None = custom(
        None, "options of the synthetic test data (dataset=synthetic)", _mapping, "a mapping of synthetic-data options"
    )


@dataclass(frozen=True)
class ModelConfig:
    """model: the backbone"""

    backbone: str = choice("mlp", f"one of {', '.join(BACKBONES)}", BACKBONES)
    mlp_hidden: list = custom(
        [100, 100], "hidden widths of the MLP, e.g. [100,100]", _mlp_hidden, "a non-empty list of positive integers"
    )
    nf: int = integer(20, "ResNet-18 width (20 reduced, 64 full)", min=1)
    head: str = choice(
        "single",
        "single (one head over all classes) or multi (each task's logits trained as its own head)",
        ("single", "multi"),
    )


@dataclass(frozen=True)
class SparsityConfig:
    """sparsity: which layers are sparse, how sparse, and on which backend"""

    sparsity: float = number(
        0.0, "fraction of zero weights in the sparse layers (0: a dense model of plain PyTorch layers)", "[0, 1)"
    )
    sparse_distribution: str = choice("uniform", "uniform or erk", ("uniform", "erk"))
    sparse_init: str = choice(
        "magnitude", "magnitude, random or global_magnitude", ("magnitude", "random", "global_magnitude")
    )
    sparse_rescale: bool = flag(
        True,
        "scale each sparse layer's kept initial weights so its output variance matches the dense init "
        "(layers feeding a batch norm are left as they are: there it would only lower the learning rate)",
    )
    layout: str = choice("unstructured", "unstructured or block", ("unstructured", "block"))
    block_size: int | list | None = unchecked(None, "block size for layout=block")
    backend: str | None = choice(
        None,
        "force a sparsekern backend (cpp, reference, triton, cuda); default automatic",
        ("triton", "cuda", "cpp", "reference"),
        nullable=True,
    )
    keep_dense: str | list = custom(
        "auto", "'auto' or a JSON list of layer names kept dense", _keep_dense, "'auto' or a list of layer names"
    )

    @staticmethod
    def check(cfg: dict) -> None:
        """Rules across keys of the group."""
        if cfg["layout"] == "block":
            bs = cfg["block_size"]
            ok = (isinstance(bs, int) and not isinstance(bs, bool) and bs > 0) or (
                isinstance(bs, list) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs)
            )
            if not ok:
                fail("block_size", "a positive integer or [bo, bk] when layout is 'block'", bs)


CORE_GROUPS: tuple[type, ...] = (CoreConfig, DataConfig, ModelConfig, SparsityConfig)

# named configurations of the core keys; methods add theirs in the registry (sparsekern_cl.registry)
CORE_PRESETS: Mapping[str, Mapping] = MappingProxyType(
    {
        # DER++ on the embedded MNIST subset, dense against 90 % sparse: the README's main job
        "demo": {
            "method": "derpp",
            "dataset": "mnist",
            "n_tasks": 5,
            "backbone": "mlp",
            "mlp_hidden": [1000, 1000],
            "sparsity": 0.9,
            "compare_dense": True,
            "epochs": 1,
            "batch_size": 32,
            "buffer_size": 500,
            "lr": 0.2,
            "alpha": 0.3,
            "beta": 0.5,
            "output_dir": "runs/demo",
        },
        # the benchmark table's setting: MNIST subset, MLP 2x100, 1 epoch per task (mammoth's seq-MNIST)
        "mnist-mlp": {
            "dataset": "mnist",
            "n_tasks": 5,
            "backbone": "mlp",
            "mlp_hidden": [100, 100],
            "epochs": 1,
            "batch_size": 10,
        },
        "cifar10": {
            "dataset": "cifar10",
            "n_tasks": 5,
            "backbone": "resnet18",
            "nf": 64,
            "epochs": 50,
            "batch_size": 32,
            "lr": 0.03,
        },
        "cifar100": {
            "dataset": "cifar100",
            "n_tasks": 10,
            "backbone": "resnet18",
            "nf": 64,
            "epochs": 50,
            "batch_size": 32,
            "lr": 0.03,
        },
        "tinyimagenet": {
            "dataset": "tinyimagenet",
            "n_tasks": 10,
            "backbone": "resnet18",
            "nf": 64,
            "epochs": 100,
            "batch_size": 32,
            "lr": 0.03,
        },
        "miniimagenet": {
            "dataset": "miniimagenet",
            "n_tasks": 10,
            "backbone": "resnet18",
            "nf": 20,
            "epochs": 50,
            "batch_size": 32,
            "lr": 0.03,
        },
    }
)


# --------------------------------------------------------------------------- every key
def config_groups() -> tuple[type, ...]:
    """Every configuration group: the core ones, then the methods' (as registered), then extra keys."""
    return CORE_GROUPS + registry.config_groups()


def _fields() -> dict[str, dataclasses.Field]:
    out: dict[str, dataclasses.Field] = {}
    owner: dict[str, str] = {}
    for g in config_groups():
        for f in group_fields(g):
            if f.name in out:
                raise ValueError(
                    f"{f.name}: expected one configuration group per key, got it in {owner[f.name]} and {g.__name__}"
                )
            out[f.name], owner[f.name] = f, g.__name__
    return out


def all_defaults() -> dict:
    """``{key: default}`` of every configuration key (a fresh dict)."""
    out = {}
    for g in config_groups():
        out.update(group_defaults(g))
    return out


def _help() -> dict:
    return {k: f.metadata.get("help", "") for k, f in _fields().items()}


def _presets() -> dict:
    out = dict(CORE_PRESETS)
    for name, preset in registry.method_presets().items():
        if name in out:
            raise ValueError(f"preset: expected a new name, got {name!r} from a method and from the core")
        out[name] = preset
    return copy.deepcopy(out)  # a caller may change what it gets; the presets stay


# read-only views, recomputed from the groups and the registry on each access
DEFAULTS: Mapping = registry.LiveView(all_defaults, "DEFAULTS")
HELP: Mapping = registry.LiveView(_help, "HELP")
PRESETS: Mapping = registry.LiveView(_presets, "PRESETS")


def register_config_keys(defaults: dict, help: dict | None = None) -> None:
    """Add configuration keys (with defaults, unchecked) for a method defined outside this package.

    A method with checked keys declares a group dataclass instead and passes it to
    :func:`sparsekern_cl.register_method` as ``config``.
    """
    known = _fields()
    for k in defaults:
        if k in known:
            raise ValueError(f"register_config_keys: {k!r} is already a configuration key")
    registry.add_config_group(registry.keys_group(defaults, help or {}))


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


def shipped_config(path: str) -> str:
    """``path`` itself if it is a file, else the config of that name shipped with the package
    (``configs/NAME.yaml`` or ``NAME.yaml``: ``sparsekern_cl/configs/`` of an install, or the
    source tree's ``configs/``), so the README's ``--config configs/...`` paths work anywhere."""
    if os.path.isfile(path) or os.path.isabs(path):
        return path
    rel = os.path.normpath(path)
    rel = rel[len("configs") + 1 :] if rel.startswith("configs" + os.sep) else rel
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(here, "configs"), os.path.join(os.path.dirname(here), "configs")):
        if os.path.isfile(os.path.join(folder, rel)):
            return os.path.join(folder, rel)
    return path


def load_config_file(path: str) -> dict:
    """Read a ``.json``, ``.yaml`` or ``.yml`` config file into a dict (see :func:`shipped_config`)."""
    path = shipped_config(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config: no file at {path!r} (nor a shipped config of that name)")
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


def validate_config(cfg: dict) -> dict:
    """Check every key; raise ``ValueError`` naming the key and what it expects.

    Every key is checked against its field (see :mod:`sparsekern_cl.options`), then the core groups'
    rules across keys, then the chosen method's own rules.  Returns the normalised copy.
    """
    cfg = dict(cfg)
    for key, f in _fields().items():  # CoreConfig comes first, so `method` is checked first
        cfg[key] = check_value(f, cfg[key])
    for g in CORE_GROUPS:
        check = getattr(g, "check", None)
        if check is not None:
            check(cfg)
    registry.get_method(cfg["method"]).validate(cfg)
    return cfg


# --------------------------------------------------------------------------- command line
def _cli_value(text: str):
    """A flag's value: JSON when it parses (numbers, lists, true/false/null), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return _parse_scalar(text)


# mammoth's spellings of some keys, accepted as extra flags
CLI_ALIASES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "buffer_size": ("--buffer_size",),
        "epochs": ("--n_epochs",),
        "method": ("--model",),
        "minibatch_size": ("--minibatch_size",),
    }
)


def build_parser(prog: str = "python -m sparsekern_cl") -> argparse.ArgumentParser:
    """The CLI parser: one flag per configuration key, in help groups (core, data, model, sparsity, methods).

    ``prog``: the command name usage shows (the console script passes ``sparsekern-cl``).
    """
    p = argparse.ArgumentParser(
        prog=prog,
        description="Continual learning on sparse compute. Every configuration key is a flag; values are JSON "
        "where that parses (numbers, true/false, null, [lists]), strings otherwise.",
    )
    p.add_argument("--config", help="a YAML or JSON file of configuration keys")
    p.add_argument("--preset", help=f"a named configuration: {', '.join(sorted(PRESETS))}")
    for g in config_groups():
        fields = group_fields(g)
        if not fields:
            continue
        used_by = registry.methods_using(g)
        title = group_title(g) + (f" ({', '.join(used_by)})" if used_by else "")
        arg_group = p.add_argument_group(title)
        for f, default in zip(fields, group_defaults(g).values()):
            flag_name = "--" + f.name.replace("_", "-")
            extra = {"nargs": "?", "const": True} if isinstance(default, bool) else {}  # `--resume` alone means true
            help_text = f.metadata.get("help", "")
            if callable(f.metadata.get("choices")):  # a set known only now (the registered methods)
                help_text += f": {', '.join(map(str, f.metadata['choices']()))}"
            arg_group.add_argument(
                flag_name,
                *CLI_ALIASES.get(f.name, ()),
                dest=f.name,
                type=_cli_value,
                default=argparse.SUPPRESS,
                metavar="V",
                help=f"{help_text} (default: {json.dumps(default)})",
                **extra,
            )
    return p
