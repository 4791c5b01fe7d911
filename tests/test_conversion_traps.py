"""Conversion traps: Linear subclasses in sparsify_, mostly-zero weights in from_dense, and layers
whose calls fall past a built backend (grouped convs, dtypes) saying so once."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from sparsekern import SparseConv2d, SparseLinear, SparsityConfig, sparsify_
from tests.support import requires_cpp


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in got]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.proj = nn.modules.linear.NonDynamicallyQuantizableLinear(16, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.proj(self.attn(x, x, x, need_weights=False)[0]))


def test_sparsify_converts_linear_subclasses_and_says_why_not_for_attention_out_proj():
    model = Block()
    x = torch.randn(2, 5, 16)
    _, msgs = _warnings_of(lambda: sparsify_(model, SparsityConfig(0.5)))
    assert isinstance(model.proj, SparseLinear) and isinstance(model.fc, SparseLinear)
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert len(msgs) == 1 and "attn.out_proj" in msgs[0] and "MultiheadAttention" in msgs[0], msgs
    model(x)


class OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_sparsify_leaves_a_subclass_with_its_own_forward_dense_with_a_reason():
    model = nn.Sequential(OwnForward(8, 8), nn.Linear(8, 2))
    _, msgs = _warnings_of(lambda: sparsify_(model, 0.5))
    assert type(model[0]) is OwnForward and isinstance(model[1], SparseLinear)
    assert any("OwnForward overrides forward()" in m for m in msgs), msgs


def test_sparsify_skips_layers_that_are_already_sparse_silently():
    model = nn.Sequential(SparseLinear(8, 8, sparsity=0.3), nn.Linear(8, 2))
    first = model[0]
    _, msgs = _warnings_of(lambda: sparsify_(model, 0.5))
    assert model[0] is first and not msgs


@pytest.mark.parametrize("cls, dense", [(SparseLinear, nn.Linear(20, 10)), (SparseConv2d, nn.Conv2d(4, 6, 3))])
def test_from_dense_of_a_mostly_zero_weight_warns_or_takes_the_zero_pattern(cls, dense):
    with torch.no_grad():
        dense.weight.masked_fill_(torch.rand_like(dense.weight) < 0.8, 0)
    layer, msgs = _warnings_of(lambda: cls.from_dense(dense))
    assert layer.density() == 1.0
    assert len(msgs) == 1 and "zeros" in msgs[0] and "mask='nonzero'" in msgs[0], msgs
    layer, msgs = _warnings_of(lambda: cls.from_dense(dense, mask="nonzero"))
    assert not msgs and torch.equal(layer.weight_mask, dense.weight != 0)
    _, msgs = _warnings_of(lambda: cls.from_dense(dense, sparsity=0.9))
    assert not msgs
    with pytest.raises(ValueError, match="'nonzero'"):
        cls.from_dense(dense, mask="zeros")


def test_from_dense_of_an_ordinary_weight_does_not_warn():
    _, msgs = _warnings_of(lambda: SparseLinear.from_dense(nn.Linear(20, 10)))
    assert not msgs


def _refused_low_precision() -> torch.dtype:
    """A half dtype the cpp backend refuses (the test is moot once it takes both)."""
    from sparsekern._backends import CallInfo, get_backend

    for dtype in (torch.float16, torch.bfloat16):
        info = CallInfo("linear", torch.device("cpu"), dtype, "unstructured", None, "unstructured")
        if not get_backend("cpp").supports(info)[0]:
            return dtype
    pytest.skip("the cpp backend runs float16 and bfloat16: no fall-back to report")


@requires_cpp
@pytest.mark.parametrize("kind", ["grouped-conv", "half-linear"])
def test_a_layer_that_falls_past_a_built_backend_says_once_where_it_runs(kind):
    if kind == "grouped-conv":
        what, x = "groups=2", torch.randn(1, 4, 5, 5)

        def make():
            return SparseConv2d(4, 4, 3, groups=2, sparsity=0.5)
    else:
        dtype = _refused_low_precision()
        what, x = str(dtype).replace("torch.", ""), torch.randn(2, 8, dtype=dtype)

        def make():
            return SparseLinear(8, 8, sparsity=0.5, dtype=dtype)

    layer = make()
    _, msgs = _warnings_of(lambda: [layer(x), layer(x)])
    assert len(msgs) == 1, msgs
    assert "runs on backend 'reference'" in msgs[0] and "'cpp' refuses" in msgs[0] and what in msgs[0]
    other = make()  # once per layer: another layer says it again
    _, msgs = _warnings_of(lambda: other(x))
    assert len(msgs) == 1


@requires_cpp
def test_a_layer_the_first_backend_runs_does_not_warn():
    layer = SparseLinear(8, 8, sparsity=0.5)
    _, msgs = _warnings_of(lambda: layer(torch.randn(2, 8)))
    assert not msgs
