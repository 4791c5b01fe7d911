"""``spmm`` (``a @ (W⊙M)ᵀ`` and ``a @ (W⊙M)``) and ``sddmm`` (``(a @ b) ⊙ M``) on every backend:
values and gradients against dense masked PyTorch (float64) over the shared case list, and
float64 gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern.testing import CONFORMANCE, assert_matches, spmm_cases
from tests.ops.helpers import call, check_against_dense, forward_backward, gradcheck
from tests.support import HALF, over_cases


@pytest.fixture
def run_op(backend):
    def run(op, fn, dtype):
        return call(backend, op, dtype, fn)

    return run


def _tensors(case, dtype, device, transpose=True):
    m, k = case.out_features, case.in_features
    mask = case.weight_mask((m, k), device)
    w = torch.randn(m, k, dtype=dtype, device=device).masked_fill(~mask, float("nan"))
    a = torch.randn(case.batch[0], k if transpose else m, dtype=dtype, device=device)
    return a, w, mask


@over_cases(spmm_cases(CONFORMANCE))
@pytest.mark.parametrize("transpose", [True, False], ids=["aWt", "aW"])
def test_spmm_matches_dense(backend, run_op, case, dtype, transpose):
    a, w, mask = _tensors(case, dtype, backend.device, transpose)
    kw = {"transpose": transpose, "layout": case.layout, "block_size": case.block, "backend": backend.name}

    def op(a, w):
        return sk.spmm(a, w, mask, **kw)

    def dense(a, w):
        return F.linear(a, w) if transpose else a @ w

    got, dy = run_op("spmm", lambda: forward_backward(op, (a, w)), dtype)
    check_against_dense(got, dense, (a, w), mask, None, dy, ("c", "da", "dw"))


@over_cases(spmm_cases(CONFORMANCE))
def test_sddmm_matches_dense(backend, run_op, case, dtype):
    m, k, n = case.out_features, case.in_features, case.batch[0]
    dev = backend.device
    mask = case.weight_mask((m, k), dev)
    p, q = torch.randn(m, n, dtype=dtype, device=dev), torch.randn(n, k, dtype=dtype, device=dev)

    def op(p, q):
        return sk.sddmm(p, q, mask, backend=backend.name, layout=case.layout, block_size=case.block)

    def dense(p, q):
        return (p @ q).masked_fill(~mask, 0)

    got, dc = run_op("sddmm", lambda: forward_backward(op, (p, q)), dtype)
    exact, _ = forward_backward(dense, (p.double(), q.double()), dc.double())
    own = forward_backward(dense, (p, q), dc)[0] if dtype in HALF else (None,) * 3
    for name, g, e, o in zip(("c", "dp", "dq"), got, exact, own):
        assert_matches(g, e, o, what=name)
    assert bool((got[0][~mask] == 0).all()), "sddmm must be exactly zero off the mask"


@pytest.mark.parametrize("case", spmm_cases("tiny"), ids=lambda c: c.id)
def test_gradcheck_spmm_sddmm(backend, run_op, case):
    dev, f64 = backend.device, torch.float64
    m, k, n = case.out_features, case.in_features, case.batch[0]
    mask = case.weight_mask((m, k), dev)
    kw = {"layout": case.layout, "block_size": case.block, "backend": backend.name}
    w = torch.randn(m, k, dtype=f64, device=dev, requires_grad=True)
    a = torch.randn(n, k, dtype=f64, device=dev, requires_grad=True)
    at = torch.randn(n, m, dtype=f64, device=dev, requires_grad=True)
    p = torch.randn(m, 3, dtype=f64, device=dev, requires_grad=True)
    q = torch.randn(3, k, dtype=f64, device=dev, requires_grad=True)
    run_op("spmm", lambda: sk.spmm(a, w, mask, **kw), f64)
    gradcheck(backend, lambda a, w: sk.spmm(a, w, mask, **kw), (a, w))
    gradcheck(backend, lambda a, w: sk.spmm(a, w, mask, transpose=False, **kw), (at, w))
    run_op("sddmm", lambda: sk.sddmm(p, q, mask, **kw), f64)
    gradcheck(backend, lambda p, q: sk.sddmm(p, q, mask, **kw), (p, q))
