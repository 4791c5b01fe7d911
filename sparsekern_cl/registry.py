"""Every continual-learning method, registered explicitly in one table: :data:`METHODS`.

A method is a core strategy (fine-tune, joint, ER, DER++, online EWC) plus, for the sparse methods,
the plugins that make it SparCL, DST or EsaCL.  Each entry declares the method's configuration
groups (dataclasses whose fields are its keys, with defaults, help text and checks: see
:mod:`sparsekern_cl.options`), its plugins, its presets and its rules across keys.  No module
registers itself when imported; this table is the one place a built-in method is named, read top
to bottom.  Methods defined outside the package are added at run time with :func:`register_method`.

:data:`STRATEGIES` (``{method: strategy class}``) is a read-only live view of the registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any

from .methods import dst, esacl, sparcl
from .options import fail, group_fields, unchecked
from .strategies import DERPP, ER, DERPPConfig, EWCConfig, EWCOnline, FineTune, Joint, ReplayConfig, Strategy

__all__ = [
    "Method",
    "METHODS",
    "STRATEGIES",
    "LiveView",
    "get_method",
    "method_names",
    "register_method",
    "unregister_method",
    "config_groups",
    "methods_using",
    "method_presets",
    "add_config_group",
    "keys_group",
]


@dataclass(frozen=True)
class Method:
    """One method: a strategy, its configuration groups, plugins, presets and rules.

    Attributes:
        name: the value of the ``method`` key.
        strategy: the core :class:`~sparsekern_cl.strategies.Strategy` class it trains with.
        configs: its configuration groups, dataclasses whose fields are its keys (shared by the
            methods that use the same keys, e.g. :class:`ReplayConfig`).
        plugins: ``plugins(cfg, model, scenario) -> [Plugin]`` for the run, or ``None``.
        presets: named configurations it brings, ``{name: {key: value}}``.
        check: ``check(cfg)``, the method's rules across keys for a run of this method (raises
            ``ValueError`` naming the key); ``None`` for none.
        help: one line about the method.
        builtin: ``False`` for methods added with :func:`register_method`.
    """

    name: str
    strategy: type[Strategy]
    configs: tuple[type, ...] = ()
    plugins: Callable[..., list] | None = None
    presets: Mapping[str, Mapping] = field(default_factory=lambda: MappingProxyType({}))
    check: Callable[[dict], None] | None = None
    help: str = ""
    builtin: bool = True

    @cached_property
    def config(self) -> type:
        """The method's settings as one frozen dataclass (every field of its groups, in order)."""
        cls_name = "".join(p.capitalize() for p in self.name.split("_")) + "Config"
        return dataclasses.make_dataclass(cls_name, [], bases=tuple(reversed(self.configs)), frozen=True)

    def options(self, cfg: dict):
        """The method's keys of a validated configuration, as an instance of :attr:`config`."""
        return self.config(**{f.name: cfg[f.name] for f in dataclasses.fields(self.config)})

    def validate(self, cfg: dict) -> None:
        """Apply the method's rules across keys (its keys' own checks run for every method)."""
        if self.check is not None:
            self.check(cfg)

    def make_plugins(self, cfg: dict, model, scenario) -> list:
        """The plugins of a run of this method (none for a core strategy)."""
        return list(self.plugins(cfg, model, scenario)) if self.plugins is not None else []


def _needs_buffer(cfg: dict) -> None:
    if cfg["buffer_size"] == 0:
        fail("buffer_size", f"a positive capacity for method {cfg['method']!r}", 0)


# --------------------------------------------------------------------------- the table
METHODS: tuple[Method, ...] = (
    # the core strategies (dense baselines; sparse when `sparsity` > 0)
    Method("finetune", FineTune, help="fine-tuning on the current task (the lower bound)"),
    Method("joint", Joint, help="joint training on the data of every task so far (the upper bound)"),
    Method("er", ER, (ReplayConfig,), check=_needs_buffer, help="experience replay"),
    Method("derpp", DERPP, (ReplayConfig, DERPPConfig), check=_needs_buffer, help="DER++"),
    Method("ewc", EWCOnline, (EWCConfig,), help="online EWC"),
    # SparCL (TDM, DDR, DGM) on ER and DER++
    Method(
        "sparcl_er",
        ER,
        (ReplayConfig, sparcl.SparCLConfig),
        sparcl.make_sparcl_plugins,
        sparcl.SPARCL_PRESETS,
        help="SparCL on experience replay",
    ),
    Method(
        "sparcl_derpp",
        DERPP,
        (ReplayConfig, DERPPConfig, sparcl.SparCLConfig),
        sparcl.make_sparcl_plugins,
        sparcl.SPARCL_PRESETS,
        help="SparCL on DER++",
    ),
    # DST: one sparse subnetwork per task, on fine-tuning
    Method(
        "dst",
        FineTune,
        (dst.DSTConfig,),
        dst.make_dst_plugins,
        check=dst.check_config,
        help="continual learning with dynamic sparse training",
    ),
    # EsaCL (SDP, IDS) on ER, DER++ and online EWC
    Method(
        "esacl_er",
        ER,
        (ReplayConfig, esacl.EsaCLConfig),
        esacl.make_esacl_plugins,
        esacl.ESACL_PRESETS,
        check=esacl.check_config,
        help="EsaCL on experience replay",
    ),
    Method(
        "esacl_derpp",
        DERPP,
        (ReplayConfig, DERPPConfig, esacl.EsaCLConfig),
        esacl.make_esacl_plugins,
        esacl.ESACL_PRESETS,
        check=esacl.check_config,
        help="EsaCL on DER++",
    ),
    Method(
        "esacl_ewc",
        EWCOnline,
        (EWCConfig, esacl.EsaCLConfig),
        esacl.make_esacl_plugins,
        esacl.ESACL_PRESETS,
        check=esacl.check_config,
        help="EsaCL on online EWC",
    ),
)

# methods and keys added at run time by register_method / register_config_keys (never at import)
_runtime: dict[str, Method] = {}
_extra_groups: list[type] = []


def _all() -> dict[str, Method]:
    out = {m.name: m for m in METHODS}
    out.update(_runtime)
    return out


# --------------------------------------------------------------------------- queries
def method_names() -> list[str]:
    """Every registered method, built-in ones in table order, then those added at run time."""
    return list(_all())


def get_method(name: str) -> Method:
    """The method registered under ``name``; ``ValueError`` naming the ``method`` key otherwise."""
    methods = _all()
    if name not in methods:
        fail("method", f"one of {tuple(methods)}", name)
    return methods[name]


def config_groups() -> tuple[type, ...]:
    """Every method's configuration groups, each once, in table order; then extra keys."""
    out: list[type] = []
    for m in _all().values():
        out.extend(g for g in m.configs if g not in out)
    return tuple(out) + tuple(_extra_groups)


def methods_using(group: type) -> list[str]:
    """Names of the methods whose keys include ``group``'s."""
    return [m.name for m in _all().values() if group in m.configs]


def method_presets() -> dict[str, Mapping]:
    """``{preset name: keys}`` of every method (a preset shared by several methods counts once)."""
    out: dict[str, Mapping] = {}
    for m in _all().values():
        for name, preset in m.presets.items():
            if name in out and out[name] is not preset:
                raise ValueError(f"preset: expected one definition of {name!r}, got two (method {m.name!r})")
            out[name] = preset
    return out


class LiveView(Mapping):
    """A read-only mapping rebuilt from the registry on every access, so it always shows what is registered."""

    def __init__(self, build: Callable[[], dict], name: str) -> None:
        self._build, self._name = build, name

    def __getitem__(self, key):
        return self._build()[key]

    def __iter__(self) -> Iterator:
        return iter(self._build())

    def __len__(self) -> int:
        return len(self._build())

    def __repr__(self) -> str:
        return f"{self._name}({self._build()!r})"


class _StrategiesView(LiveView):
    def pop(self, name: str, *default):
        """Unregister a method added with :func:`register_method` (built-in methods stay); returns its strategy."""
        if name not in _runtime and default:
            return default[0]
        return unregister_method(name).strategy


STRATEGIES: Mapping[str, type[Strategy]] = _StrategiesView(
    lambda: {n: m.strategy for n, m in _all().items()}, "STRATEGIES"
)


# --------------------------------------------------------------------------- run-time registration
def _known_keys() -> set[str]:
    from .config import CORE_GROUPS  # config imports this module: read its groups only when called

    return {f.name for g in CORE_GROUPS + config_groups() for f in group_fields(g)}


def register_method(
    name: str,
    base: str,
    make_plugins,
    *,
    config: type | None = None,
    presets: Mapping[str, Mapping] | None = None,
    check: Callable[[dict], None] | None = None,
    help: str = "",
) -> Method:
    """Register a method ``name`` = the strategy of method ``base`` plus ``make_plugins(cfg, model, scenario) -> [Plugin]``.

    Args:
        name: the new ``method`` value.
        base: a registered method; the new one trains with its strategy and accepts its keys.
        make_plugins: builds the run's plugins from the validated configuration.
        config: a group dataclass of the method's own keys (fields made with
            :mod:`sparsekern_cl.options`), or ``None``.
        presets: named configurations the method brings.
        check: the method's rules across keys, ``check(cfg)``.
        help: one line about the method.

    Raises:
        ValueError: ``base`` is not registered, ``name`` is, or a key or preset of the method exists already.
    """
    methods = _all()
    if base not in methods:
        raise ValueError(f"base: expected one of {sorted(methods)}, got {base!r}")
    if name in methods:
        raise ValueError(f"name: expected a method name not registered yet, got {name!r}")
    b = methods[base]
    configs = b.configs
    if config is not None and config not in configs:
        clash = sorted({f.name for f in group_fields(config)} & _known_keys())
        if clash:
            raise ValueError(f"config: expected new configuration keys, got existing ones {clash}")
        configs = configs + (config,)
    if presets:
        from .config import PRESETS

        clash = sorted(set(presets) & set(PRESETS))
        if clash:
            raise ValueError(f"presets: expected new preset names, got existing ones {clash}")
    m = Method(
        name, b.strategy, configs, make_plugins, MappingProxyType(dict(presets or {})), check, help, builtin=False
    )
    _runtime[name] = m
    return m


def unregister_method(name: str) -> Method:
    """Remove a method added with :func:`register_method`; returns it."""
    if name not in _runtime:
        known = sorted(_runtime)
        fail(
            "name",
            f"a method added with register_method (one of {known})"
            if known
            else "a method added with register_method (none is)",
            name,
        )
    return _runtime.pop(name)


def keys_group(defaults: dict, help: dict) -> type:
    """A group dataclass of unchecked keys (what :func:`sparsekern_cl.register_config_keys` adds)."""
    fields = [(k, Any, unchecked(v, help.get(k, ""))) for k, v in defaults.items()]
    group = dataclasses.make_dataclass(f"ExtraKeys{len(_extra_groups)}", fields, frozen=True)
    group.__doc__ = "extra keys: added with register_config_keys"
    return group


def add_config_group(group: type) -> None:
    """Add a group of keys that belongs to no registered method (see :func:`keys_group`)."""
    _extra_groups.append(group)
