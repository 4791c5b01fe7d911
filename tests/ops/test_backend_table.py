"""The support matrix the op suites skip by (tests.support.DOCUMENTED) is the README's backend
table, and every backend's verifier accepts exactly what the table documents: a skip in the op
suites is never a missing feature, and the README never promises one."""

from __future__ import annotations

import re

import pytest

from sparsekern._backends import OPS, CallInfo, ConvParams
from sparsekern.formats import BlockSize
from tests.support import BF16, DOCUMENTED, DTYPES, FP16, FP32, FP64, ROOT, Target, backend_params, documented

TOKENS = {"fp32": FP32, "fp64": FP64, "fp16": FP16, "bf16": BF16}


def _readme_rows() -> dict[str, list[str]]:
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"\|\s*`(\w+)`\s*\|(.*)\|(.*)\|(.*)\|\s*$", line)
        if m and m.group(1) in DOCUMENTED:
            rows[m.group(1)] = [m.group(2), m.group(3), m.group(4)]
    return rows


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_documented_matrix_is_the_readme_table(name):
    ops, dtypes, _notes = _readme_rows()[name]
    row = DOCUMENTED[name]
    if "everything" in ops:
        assert set(row.ops) == set(OPS) and row.conv == "any"
    else:
        assert set(re.findall(r"\b(linear|spmm|sddmm|conv2d)\b", ops)) == set(row.ops)
        conv = re.search(r"conv2d \(([^)]*)\)", ops)
        assert (conv.group(1) if conv else "any") == row.conv
    if "everything" in dtypes:
        assert set(row.dtypes) == set(DTYPES)
        return
    plain, _, interp = dtypes.partition(";")  # "fp32 ..., bf16; fp64 in the interpreter"
    assert _dtypes(plain) == set(row.dtypes)
    assert _dtypes(interp) == set(row.interpreter_dtypes) and (not interp or "interpreter" in interp)


def _dtypes(text: str) -> set:
    return {TOKENS[t] for t in re.findall(r"fp\d+|bf16", text)}


def _grid(device):
    """(op, dtype, layout, conv, weight shape) over every op and dtype, with conv groups=1,
    depthwise and grouped."""
    convs = [
        (ConvParams(), (32, 16, 3, 3)),
        (ConvParams(groups=16), (32, 1, 3, 3)),
        (ConvParams(groups=2), (32, 8, 3, 3)),
    ]
    for op in OPS:
        for dtype in DTYPES:
            for layout in ("unstructured", "block"):
                for conv, wshape in convs if op == "conv2d" else [(None, None)]:
                    taps = 9 if op == "conv2d" else 1
                    block = BlockSize(16, 16 * taps) if layout == "block" else None
                    yield CallInfo(op, device, dtype, layout, block, layout, conv, wshape)


@pytest.mark.parametrize("backend", backend_params())
def test_verifier_accepts_exactly_the_documented_matrix(backend):
    target = Target(backend)
    impl = target.impl
    ok, why = impl.available()
    assert ok, why
    wrong = []
    for info in _grid(target.device):
        ok, why = impl.supports(info)
        groups = info.conv.groups if info.conv else 1
        doc = documented(backend, info.op, info.dtype, info.weight_shape, groups)
        if ok != doc:
            wrong.append(f"{info.op} {info.dtype} {info.layout} groups={groups}: verifier {ok} ({why}), README {doc}")
    assert not wrong, "\n".join(wrong)
