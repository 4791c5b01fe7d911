"""Typed configuration groups: a dataclass per group, one field per configuration key.

A field's ``metadata`` says everything the rest of the package needs about the key: ``help``
(the CLI text), ``kind`` and its parameters (``choices``, ``range``, ``min``, ``nullable``) or a
``check`` callable, and ``expected`` (what an error message says was expected).  The helpers below
build such fields; :func:`check_value` applies one, :func:`check_group` a whole group::

    @dataclass(frozen=True)
    class MyConfig:
        "my method: what its keys do"

        my_rate: float = number(0.5, "fraction of ... dropped", "[0, 1]")
        my_mode: str = choice("fast", "fast or exact", ("fast", "exact"))

Error messages name the key and what it expects: ``my_rate: expected a number in [0.0, 1.0], got 2``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = [
    "flag",
    "choice",
    "integer",
    "number",
    "text",
    "custom",
    "unchecked",
    "check_value",
    "check_group",
    "group_fields",
    "group_defaults",
    "group_title",
    "expected_text",
    "fail",
]


def fail(key: str, expected: str, value) -> None:
    """Raise the package's validation error: ``key: expected ..., got value``."""
    raise ValueError(f"{key}: expected {expected}, got {value!r}")


def _field(default, meta: dict):
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag(default: bool | None, help: str, *, nullable: bool = False):
    """A ``true``/``false`` key (``nullable``: ``null`` is allowed too)."""
    return _field(default, {"help": help, "kind": "bool", "nullable": nullable, "expected": "true or false"})


def choice(
    default,
    help: str,
    choices: Sequence | Callable[[], Sequence],
    *,
    nullable: bool = False,
    expected: str | None = None,
):
    """One of ``choices`` (a sequence, or a callable returning one when the set is only known later)."""
    return _field(
        default, {"help": help, "kind": "choice", "choices": choices, "nullable": nullable, "expected": expected}
    )


def integer(default: int | None, help: str, *, min: int | None = None, nullable: bool = False):
    """An integer (never a bool), at least ``min`` when given."""
    expected = f"an integer >= {min}" if min is not None else "an integer"
    return _field(default, {"help": help, "kind": "int", "min": min, "nullable": nullable, "expected": expected})


def _parse_range(text: str) -> tuple[float, float, bool, bool]:
    t = text.replace(" ", "")
    if len(t) < 5 or t[0] not in "[(" or t[-1] not in "])" or t.count(",") != 1:
        raise ValueError(f"range: expected an interval such as '[0, 1)', got {text!r}")
    lo, hi = t[1:-1].split(",")
    return float(lo), float(hi), t[0] == "(", t[-1] == ")"


def number(default: float, help: str, range: str = "[-inf, inf]"):
    """A real number (ints accepted, stored as float; never a bool or NaN) inside ``range``, e.g. ``"[0, 1)"``."""
    lo, hi, lo_open, hi_open = _parse_range(range)
    expected = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return _field(default, {"help": help, "kind": "number", "range": (lo, hi, lo_open, hi_open), "expected": expected})


def text(default: str | None, help: str, expected: str, *, nullable: bool = False):
    """A string (a path, a device name)."""
    return _field(default, {"help": help, "kind": "str", "nullable": nullable, "expected": expected})


def custom(default, help: str, check: Callable[[str, Any], Any], expected: str):
    """A key with its own ``check(key, value) -> value`` (it may normalise the value, or call :func:`fail`)."""
    return _field(default, {"help": help, "kind": "custom", "check": check, "expected": expected})


def unchecked(default, help: str):
    """A key without a check of its own (its group's cross-key ``check`` may look at it)."""
    return _field(default, {"help": help})


def _choices(meta: dict) -> tuple:
    c = meta["choices"]
    return tuple(c() if callable(c) else c)


def expected_text(f: dataclasses.Field) -> str:
    """What a valid value of field ``f`` is, as error messages say it."""
    meta = f.metadata
    if meta.get("expected"):
        return meta["expected"]
    if meta.get("kind") == "choice":
        return f"one of {_choices(meta)}"
    return "a value"


def check_value(f: dataclasses.Field, value):
    """``value`` checked against field ``f``'s metadata (and normalised); raises ``ValueError`` naming the key."""
    meta, key = f.metadata, f.name
    kind = meta.get("kind")
    if value is None and meta.get("nullable"):
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            fail(key, expected_text(f), value)
    elif kind == "choice":
        if value not in _choices(meta):
            fail(key, expected_text(f), value)
    elif kind == "int":
        lo = meta["min"]
        if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo):
            fail(key, expected_text(f), value)
    elif kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            fail(key, "a number", value)
        lo, hi, lo_open, hi_open = meta["range"]
        if (value <= lo if lo_open else value < lo) or (value >= hi if hi_open else value > hi):
            fail(key, expected_text(f), value)
        return float(value)
    elif kind == "str":
        if not isinstance(value, str):
            fail(key, expected_text(f), value)
    elif kind == "custom":
        return meta["check"](key, value)
    return value


def group_fields(group: type) -> tuple[dataclasses.Field, ...]:
    """The configuration fields of a group dataclass, in declaration order."""
    return dataclasses.fields(group)


def group_defaults(group: type) -> dict:
    """``{key: default}`` of a group (fresh copies of list and dict defaults)."""
    return {k: v for k, v in dataclasses.asdict(group()).items()}


def group_title(group: type) -> str:
    """The first line of the group's docstring (its CLI help heading)."""
    return (group.__doc__ or group.__name__).strip().splitlines()[0].rstrip(".")


def check_group(groups: type | Iterable[type], cfg: dict) -> dict:
    """``{key: checked value}`` for every key of ``groups`` (one dataclass or several) read from ``cfg``."""
    if isinstance(groups, type):
        groups = (groups,)
    return {f.name: check_value(f, cfg[f.name]) for g in groups for f in group_fields(g)}
