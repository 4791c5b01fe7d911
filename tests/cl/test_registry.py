"""The method registry: typed config groups, checks that name the key, help groups, no import-time registration."""

import ast
import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest

import sparsekern_cl
from sparsekern_cl import registry
from sparsekern_cl.config import CORE_GROUPS, build_parser, config_groups, resolve_config
from sparsekern_cl.options import group_fields

CL = pathlib.Path(sparsekern_cl.__file__).parent
BUILTIN = (
    "finetune",
    "joint",
    "er",
    "derpp",
    "ewc",
    "sparcl_er",
    "sparcl_derpp",
    "dst",
    "esacl_er",
    "esacl_derpp",
    "esacl_ewc",
)


def test_the_table_lists_every_builtin_method_once():
    names = [m.name for m in registry.METHODS]
    assert names == list(BUILTIN)
    assert list(sparsekern_cl.STRATEGIES) == names  # nothing else registered at import


@pytest.mark.parametrize("name", BUILTIN)
def test_every_method_has_a_config_dataclass(name):
    m = registry.get_method(name)
    assert dataclasses.is_dataclass(m.config) and all(dataclasses.is_dataclass(g) for g in m.configs)
    keys = {f.name for f in dataclasses.fields(m.config)}
    assert keys == {f.name for g in m.configs for f in group_fields(g)}
    cfg = resolve_config({"method": name, "sparsity": 0.5})
    opts = m.options(cfg)  # a typed view of the method's keys
    assert all(getattr(opts, k) == cfg[k] for k in keys)
    assert issubclass(m.strategy, sparsekern_cl.Strategy)


def test_every_key_has_help_a_default_and_one_group():
    groups = config_groups()
    assert groups[: len(CORE_GROUPS)] == CORE_GROUPS
    seen = {}
    for g in groups:
        for f in group_fields(g):
            assert f.name not in seen, (f.name, g, seen.get(f.name))
            seen[f.name] = g
            assert f.metadata.get("help"), f.name
    assert set(seen) == set(sparsekern_cl.DEFAULTS) == set(sparsekern_cl.config.HELP)
    assert sparsekern_cl.DEFAULTS["sparcl_delta"] == 5 and sparsekern_cl.DEFAULTS["dst_growth"] == "random"
    assert sparsekern_cl.DEFAULTS["esacl_tau"] == 5.0 and sparsekern_cl.DEFAULTS["buffer_size"] == 200


def _bad_values(f):
    """Values that the field's own check must refuse."""
    kind = f.metadata.get("kind")
    if kind == "bool":
        return ["yes", 1]
    if kind == "int":
        return [1.5, True] + ([f.metadata["min"] - 1] if f.metadata["min"] is not None else [])
    if kind == "number":
        lo, hi, lo_open, hi_open = f.metadata["range"]
        outside = [lo - 1, hi + 1] + ([lo] if lo_open else []) + ([hi] if hi_open else [])
        return ["x", True, float("nan")] + [v for v in outside if abs(v) != float("inf")]
    if kind == "choice":
        return ["__nope__"]
    if kind == "str":
        return [3]
    if kind == "custom":
        return [{"a": 1}] if f.name != "synthetic" else [[1]]
    return []


_CHECKED = [
    (f.name, v) for g in CORE_GROUPS + registry.config_groups() for f in group_fields(g) for v in _bad_values(f)
]


@pytest.mark.parametrize("key,value", _CHECKED, ids=[f"{k}={v!r}" for k, v in _CHECKED])
def test_a_bad_value_raises_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"^{key}: expected .+, got "):
        resolve_config({"method": "er", key: value})


def test_checked_numbers_are_stored_as_float_and_ints_stay_ints():
    cfg = resolve_config({"method": "esacl_er", "sparsity": 0.5, "esacl_tau": 2, "sparcl_delta": 3})
    assert cfg["esacl_tau"] == 2.0 and isinstance(cfg["esacl_tau"], float)
    assert cfg["sparcl_delta"] == 3 and isinstance(cfg["sparcl_delta"], int)


def test_method_rules_apply_to_that_method_only():
    with pytest.raises(ValueError, match="sparsity: EsaCL prunes"):
        resolve_config({"method": "esacl_er"})
    with pytest.raises(ValueError, match="weight_decay: expected 0 for method 'dst'"):
        resolve_config({"method": "dst", "sparsity": 0.5, "weight_decay": 1e-4})
    with pytest.raises(ValueError, match="buffer_size: expected a positive capacity for method 'derpp'"):
        resolve_config({"method": "derpp", "buffer_size": 0})
    resolve_config({"method": "finetune", "sparsity": 0.5, "weight_decay": 1e-4, "buffer_size": 0})
    resolve_config({"method": "sparcl_er", "buffer_size": 0})  # as before: only er and derpp insist on a buffer


def test_cli_help_is_grouped():
    p = build_parser()
    titles = [g.title for g in p._action_groups]
    for head in ("core", "data", "model", "sparsity", "replay buffer", "DER++", "online EWC", "SparCL", "DST", "EsaCL"):
        assert sum(t.startswith(head) for t in titles) == 1, (head, titles)
    assert "(sparcl_er, sparcl_derpp)" in next(t for t in titles if t.startswith("SparCL"))
    flags = {a.dest: g.title for g in p._action_groups for a in g._group_actions}
    assert set(sparsekern_cl.DEFAULTS) <= set(flags)
    assert flags["lr"].startswith("core") and flags["nf"].startswith("model") and flags["layout"].startswith("sparsity")
    assert flags["dst_growth"].startswith("DST") and flags["esacl_rho"].startswith("EsaCL")


def test_cli_help_runs_with_a_preset():
    out = subprocess.run(
        [sys.executable, "-m", "sparsekern_cl", "--preset", "demo", "--help"],
        capture_output=True,
        text=True,
        cwd=CL.parent,
        check=True,
    ).stdout
    assert "SparCL" in out and "--sparcl-delta" in out and "--dst-growth" in out and "mnist-mlp" in out


def test_views_are_read_only_and_live():
    with pytest.raises(TypeError):
        sparsekern_cl.PRESETS["mine"] = {}
    sparsekern_cl.PRESETS["demo"]["lr"] = 9.0  # a copy: the preset does not change
    assert sparsekern_cl.PRESETS["demo"]["lr"] == 0.2
    assert {"sparcl-paper", "sparcl-official", "demo", "mnist-mlp"} <= set(sparsekern_cl.PRESETS)
    assert json.dumps(dict(sparsekern_cl.DEFAULTS))


def test_no_method_module_registers_itself():
    # static: no registration call and no package auto-import in sparsekern_cl/methods
    for path in (CL / "methods").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)):
                name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
                assert name not in ("register_method", "register_config_keys", "import_module", "iter_modules"), path
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(m in ("pkgutil", "importlib") for m in mods), path
    # dynamic: importing (and reloading) every method module leaves the registry and the views as they were
    code = """
import importlib, json
import sparsekern_cl
from sparsekern_cl import config, registry, strategies
def snap():
    return json.dumps([registry.method_names(), sorted(config.PRESETS), dict(config.DEFAULTS), dict(config.HELP),
                       [g.__name__ for g in config.config_groups()]], sort_keys=True, default=repr)
before = snap()
import sparsekern_cl.methods.dst, sparsekern_cl.methods.esacl, sparsekern_cl.methods.sparcl
for mod in (sparsekern_cl.methods.dst, sparsekern_cl.methods.esacl, sparsekern_cl.methods.sparcl,
            sparsekern_cl.methods.masking, sparsekern_cl.methods, strategies):
    importlib.reload(mod)
# nothing was added at run time either: the built-in methods are the table's, no module registered one
print(before == snap() and registry._runtime == {} and registry._extra_groups == [])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=CL.parent, check=True)
    assert out.stdout.strip() == "True", out.stderr


@dataclasses.dataclass(frozen=True)
class _SpyConfig:
    """spy: a test method"""

    spy_level: int = sparsekern_cl.options.integer(2, "how closely to watch", min=1)


def test_register_method_at_run_time_with_a_config_and_presets():
    m = sparsekern_cl.register_method(
        "er_watch",
        "er",
        lambda cfg, model, scenario: [],
        config=_SpyConfig,
        presets={"watch-closely": {"spy_level": 5}},
        help="ER, watched",
    )
    try:
        assert m.configs[-1] is _SpyConfig and not m.builtin and m.strategy is sparsekern_cl.strategies.ER
        assert resolve_config({"method": "er_watch", "preset": "watch-closely"})["spy_level"] == 5
        with pytest.raises(ValueError, match="spy_level: expected an integer >= 1, got 0"):
            resolve_config({"method": "er_watch", "spy_level": 0})
        titles = [g.title for g in build_parser()._action_groups]
        assert "spy: a test method (er_watch)" in titles
        with pytest.raises(ValueError, match="name: expected a method name not registered yet"):
            sparsekern_cl.register_method("er_watch", "er", lambda *a: [])
        with pytest.raises(ValueError, match="config: expected new configuration keys"):
            sparsekern_cl.register_method("er_watch2", "er", lambda *a: [], config=sparsekern_cl.strategies.EWCConfig)
        with pytest.raises(ValueError, match="base: expected one of"):
            sparsekern_cl.register_method("x", "nope", lambda *a: [])
    finally:
        sparsekern_cl.unregister_method("er_watch")
    assert "er_watch" not in sparsekern_cl.STRATEGIES and "spy_level" not in sparsekern_cl.DEFAULTS
    with pytest.raises(ValueError, match="name: expected a method added with register_method"):
        sparsekern_cl.unregister_method("er")  # built-in methods stay
    assert sparsekern_cl.STRATEGIES.pop("not_there", None) is None


def test_register_config_keys_adds_unchecked_keys(monkeypatch):
    monkeypatch.setattr(registry, "_extra_groups", [])
    sparsekern_cl.register_config_keys({"my_knob": 3}, {"my_knob": "a knob"})
    assert sparsekern_cl.DEFAULTS["my_knob"] == 3 and sparsekern_cl.config.HELP["my_knob"] == "a knob"
    assert resolve_config({"my_knob": "anything"})["my_knob"] == "anything"
    assert any(g.title.startswith("extra keys") for g in build_parser()._action_groups)
    with pytest.raises(ValueError, match="'lr' is already a configuration key"):
        sparsekern_cl.register_config_keys({"lr": 1.0})
