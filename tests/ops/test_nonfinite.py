"""One semantics for NaN / Inf on every backend: a pruned weight does not exist.

Each result must equal the computation that never forms a term with a pruned weight, written
here term by term in float64 (zero padding multiplies as the zero it is; an output outside ``y``
has no term in ``dx``).  NaN / Inf go into ``x``, into ``W`` inside and outside ``M``, and into
``dy``, for linear and conv2d, forward, input and weight gradient, on every backend under test
and on the dense fall-back of the automatic choice (``sparsekern.choice.DENSE``).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import sparsekern as sk
from sparsekern import choice
from sparsekern.testing import make_block_mask, make_mask
from tests.ops.helpers import call
from tests.support import BACKENDS, MARKS, Target

INF, NAN = float("inf"), float("nan")
WHERE = ("x", "w_in", "w_out", "dy")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter on NaN / Inf
TARGETS = [pytest.param(n, marks=MARKS[n], id=n) for n in BACKENDS] + [pytest.param("dense", id="dense")]


@pytest.fixture
def target(request, monkeypatch):
    """A backend name (``backend=``), or ``"dense"``: the automatic order with every call sent to
    the dense fall-back."""
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    if request.param == "dense":
        monkeypatch.setattr(choice, "choose", lambda *a, **k: choice.DENSE)
        return None, Target("reference")
    return request.param, Target(request.param)


def _poison(t: torch.Tensor, where: torch.Tensor, gen: torch.Generator, values=(INF, -INF, NAN)) -> torch.Tensor:
    """``t`` with a few of the positions ``where`` set to each of ``values``."""
    t = t.clone()
    idx = where.flatten().nonzero().flatten()
    pick = idx[torch.randperm(idx.numel(), generator=gen)[: 2 * len(values)]]
    flat = t.view(-1)
    for i, p in enumerate(pick):
        flat[p] = values[i % len(values)]
    return t


def _inputs(x, w, m, dy_shape, where, gen):
    w = w.masked_fill(~m, NAN) if where != "w_out" else _poison(w, ~m, gen)
    if where == "w_in":
        w = _poison(w, m, gen)
    if where == "x":
        x = _poison(x, torch.ones_like(x, dtype=torch.bool), gen)
    dy = torch.randn(dy_shape, generator=gen, dtype=x.dtype)
    if where == "dy":
        dy = _poison(dy, torch.ones_like(dy, dtype=torch.bool), gen)
    return x, w, dy


def _same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Same NaN positions, same signed Infs, the finite values close."""
    got, want = got.detach().double().cpu(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (
        f"{what}: NaN at {int(torch.isnan(got).sum())} positions, expected {int(torch.isnan(want).sum())}"
    )
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf), f"{what}: Inf positions differ"
    assert torch.equal(got[inf], want[inf]), f"{what}: an Inf has the wrong sign"
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-4, atol=1e-4, msg=f"{what}: finite values differ")


def _run(name, target, fn, x, w, dy, op, groups=1):
    xl, wl = (t.to(target.device, copy=True).requires_grad_() for t in (x, w))
    y = call(target, op, x.dtype, lambda: fn(xl, wl, name), tuple(w.shape), groups)
    y.backward(dy.to(y.device))
    return y, xl.grad, wl.grad


# ------------------------------------------------------------------------------------------------
# linear
# ------------------------------------------------------------------------------------------------


def _linear_terms(x, w, m, dy):
    """y, dx, dW of ``y = x (W⊙M)ᵀ``, summing only the terms of existing connections."""
    x, w, dy = x.double(), w.double(), dy.double()
    zero = torch.zeros((), dtype=torch.float64)
    y = torch.where(m[None], x[:, None, :] * w[None], zero).sum(2)
    dx = torch.where(m[None], dy[:, :, None] * w[None], zero).sum(1)
    dw = torch.where(m, (dy[:, :, None] * x[:, None, :]).sum(0), zero)
    return y, dx, dw


@pytest.mark.parametrize("layout", ["unstructured", "block"])
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("target", TARGETS, indirect=True)
def test_linear_nonfinite(target, where, layout):
    name, tgt = target
    gen = torch.Generator().manual_seed(3)
    if layout == "block":
        w, x = torch.randn(48, 40, generator=gen), torch.randn(5, 40, generator=gen)
        m = make_block_mask(w.shape, (16, 16), 0.5, generator=gen)
        kw = {"layout": "block", "block_size": 16}
    else:
        w, x = torch.randn(12, 9, generator=gen), torch.randn(5, 9, generator=gen)
        m = make_mask(w.shape, "random", 0.4, generator=gen)
        m[:, 0] = False  # an input column with no connection at all
        kw = {}
    x, w, dy = _inputs(x, w, m, (x.shape[0], w.shape[0]), where, gen)

    def fn(xl, wl, be):
        return sk.sparse_linear(xl, wl, None, m.to(xl.device), backend=be, **kw)

    got = _run(name, tgt, fn, x, w, dy, "linear")
    for what, g, e in zip(("y", "dx", "dW"), got, _linear_terms(x, w, m, dy)):
        _same(g, e, what)


# ------------------------------------------------------------------------------------------------
# conv2d
# ------------------------------------------------------------------------------------------------


def _conv_terms(x, w, m, dy, stride, pad, groups):
    """y, dx, dW of ``conv2d(x, W⊙M)`` tap by tap: padding is read as zeros, a pruned tap adds
    no term, ``dx`` gathers only from the outputs that exist."""
    x, w, dy = x.double(), w.double(), dy.double()
    zero = torch.zeros((), dtype=torch.float64)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    og = o // groups
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    y = torch.zeros(dy.shape, dtype=torch.float64)
    dxp = torch.zeros(xp.shape, dtype=torch.float64)
    dw = torch.zeros(w.shape, dtype=torch.float64)
    for g, oh, ow, i, j in itertools.product(
        range(groups), range(dy.shape[2]), range(dy.shape[3]), range(kh), range(kw)
    ):
        rows, chans = slice(g * og, (g + 1) * og), slice(g * cg, (g + 1) * cg)
        ih, iw = oh * stride + i, ow * stride + j
        keep = m[rows, :, i, j][None]  # [1, og, cg]
        xs = xp[:, chans, ih, iw][:, None, :]  # [n, 1, cg]
        ws = w[rows, :, i, j][None]  # [1, og, cg]
        ds = dy[:, rows, oh, ow][:, :, None]  # [n, og, 1]
        y[:, rows, oh, ow] += torch.where(keep, xs * ws, zero).sum(2)
        dxp[:, chans, ih, iw] += torch.where(keep, ds * ws, zero).sum(1)
        dw[rows, :, i, j] += (ds * xs).sum(0)
    dx = dxp[:, :, pad : pad + h, pad : pad + wd]
    return y, dx, torch.where(m, dw, zero)


CONV = [
    pytest.param((2, 3, 6, 6), (4, 3, 3, 3), 1, 0, 1, "unstructured", id="k3-p0"),
    pytest.param((2, 3, 6, 5), (4, 3, 3, 3), 2, 1, 1, "unstructured", id="k3-s2-p1"),
    pytest.param((1, 4, 5, 5), (4, 1, 3, 3), 1, 1, 4, "unstructured", id="depthwise-p1"),
    pytest.param((1, 32, 4, 4), (32, 32, 3, 3), 1, 1, 1, "block", id="block16-p1"),
]


@pytest.mark.parametrize("x_shape,w_shape,stride,pad,groups,layout", CONV)
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("target", TARGETS, indirect=True)
def test_conv2d_nonfinite(target, where, x_shape, w_shape, stride, pad, groups, layout, monkeypatch):
    name, tgt = target
    gen = torch.Generator().manual_seed(4)
    x, w = torch.randn(x_shape, generator=gen), torch.randn(w_shape, generator=gen)
    if layout == "block":
        m = make_block_mask(w.shape, (16, 16), 0.5, generator=gen)
        kw = {"layout": "block", "block_size": 16}
    else:
        m = make_mask(w.shape, "random", 0.5, generator=gen)
        m[0, 0, 0, 0] = True
        kw = {}
    if where == "w_in":  # an Inf weight at a corner tap: it reads padding and meets edge outputs
        o, c = m[:, :, 0, 0].nonzero()[0].tolist()
        w[o, c, 0, 0] = INF
    ho = (x_shape[2] + 2 * pad - w_shape[2]) // stride + 1
    wo = (x_shape[3] + 2 * pad - w_shape[3]) // stride + 1
    x, w, dy = _inputs(x, w, m, (x_shape[0], w_shape[0], ho, wo), where, gen)

    def fn(xl, wl, be):
        return sk.sparse_conv2d(xl, wl, None, m.to(xl.device), None, stride, pad, 1, groups, backend=be, **kw)

    want = _conv_terms(x, w, m, dy, stride, pad, groups)
    for algo in ("gemm", "direct") if name == "cpp" else ("auto",):  # both cpp conv algorithms
        monkeypatch.setenv("SPARSEKERN_CPU_CONV_ALGO", algo)
        got = _run(name, tgt, fn, x, w, dy, "conv2d", groups)
        for what, g, e in zip(("y", "dx", "dW"), got, want):
            _same(g, e, f"{what} ({algo})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_finite_check_is_sound(dtype):
    """The per-pass check (one sum per tensor) never calls a tensor with a NaN / Inf finite."""
    from sparsekern.reference import _all_finite

    g = torch.Generator().manual_seed(3)
    t = torch.randn(37, 53, generator=g).to(dtype)
    assert _all_finite(t) and _all_finite(t[:0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        for pos in (0, 17 * 53 + 4, t.numel() - 1):
            u = t.clone()
            u.view(-1)[pos] = bad
            assert not _all_finite(t, u) and not _all_finite(u)
    pair = t.clone()
    pair.view(-1)[:2] = torch.tensor([float("inf"), -float("inf")]).to(dtype)  # inf - inf: NaN sum
    assert not _all_finite(pair)
