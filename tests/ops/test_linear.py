"""``sparse_linear`` on every backend: forward, input and weight gradients against dense masked
PyTorch (float64) over the shared case list, float64 gradcheck, the module and optimizer path,
the registered C++ ops (opcheck, argument checks) and the Triton launchers' argument checks, and
the public op's argument checks."""

from __future__ import annotations

import pytest
import torch

import sparsekern as sk
from sparsekern.formats import Pattern, pattern_of
from sparsekern.testing import CONFORMANCE, assert_close, linear_cases, make_block_mask, make_mask
from tests.ops.helpers import (
    OPTIMIZERS,
    call,
    check_frozen_weights_never_move,
    check_linear_case,
    gradcheck,
)
from tests.support import over_cases, requires_cpp, requires_triton


def _layout_kw(case):
    return {"layout": case.layout, "block_size": case.block}


@pytest.fixture
def linear_op(backend):
    """``sparse_linear`` on the backend under test; a refusal skips or fails by the support matrix."""

    def run(fn, dtype):
        return call(backend, "linear", dtype, fn)

    return run


# ------------------------------------------------------------------------------------------------
# against dense masked PyTorch
# ------------------------------------------------------------------------------------------------


@over_cases(linear_cases(CONFORMANCE))
def test_linear_matches_dense(backend, linear_op, case, dtype):
    """Both passes of a case: with a bias and its first gradient mask, without and its second
    (see LinearCase.grad_kinds); weights outside the mask are NaN."""
    check_linear_case(backend, case, dtype)


# ------------------------------------------------------------------------------------------------
# float64 gradcheck on tiny shapes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", linear_cases("tiny"), ids=lambda c: c.id)
def test_gradcheck_linear(backend, linear_op, case):
    dev = backend.device
    mask = case.weight_mask((case.out_features, case.in_features), dev)
    assert case.kind in ("dense", "single") or 0 < int(mask.sum()) < mask.numel(), "the case needs a mixed mask"
    x = torch.randn(*case.batch, case.in_features, dtype=torch.float64, device=dev, requires_grad=True)
    w = torch.randn(case.out_features, case.in_features, dtype=torch.float64, device=dev, requires_grad=True)
    b = torch.randn(case.out_features, dtype=torch.float64, device=dev, requires_grad=True)

    def fn(x, w, b):
        return sk.sparse_linear(x, w, b, mask, backend=backend.name, **_layout_kw(case))

    linear_op(lambda: fn(x, w, b), torch.float64)  # the support matrix, before gradcheck's own errors
    gradcheck(backend, fn, (x, w, b))


# ------------------------------------------------------------------------------------------------
# modules and optimizers
# ------------------------------------------------------------------------------------------------


def test_module_trains_on_the_backend_via_env(backend, linear_op, monkeypatch):
    """``SPARSEKERN_BACKEND`` routes a ``SparseLinear``'s forward and weight gradient to the
    backend, and the step's gradients equal the reference module's."""
    torch.manual_seed(5)
    dev = backend.device
    lin = torch.nn.Linear(30, 20)
    layer = sk.SparseLinear.from_dense(lin, make_mask((20, 30), "random", 0.3)).to(dev)
    ref = sk.SparseLinear.from_dense(lin, layer.weight_mask.cpu().clone()).to(dev)
    impl = backend.impl
    calls = []
    for name in ("linear_fwd", "linear_dw"):
        real = getattr(impl, name)
        monkeypatch.setattr(impl, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    x = torch.randn(7, 30, device=dev)
    monkeypatch.setenv("SPARSEKERN_BACKEND", backend.name)
    linear_op(lambda: layer(x).square().sum().backward(), torch.float32)
    assert calls == ["linear_fwd", "linear_dw"]
    monkeypatch.setenv("SPARSEKERN_BACKEND", "reference")
    ref(x).square().sum().backward()
    assert_close(layer.weight.grad, ref.weight.grad)
    assert_close(layer.bias.grad, ref.bias.grad)
    assert bool((layer.weight.grad[~layer.grad_mask] == 0).all())


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_weights_outside_grad_mask_never_move(backend, linear_op, opt_name):
    layer = sk.SparseLinear(12, 8, sparsity=0.5, backend=backend.name)
    check_frozen_weights_never_move(
        layer, lambda: torch.randn(4, 12, device=backend.device), backend, linear_op, opt_name
    )


# ------------------------------------------------------------------------------------------------
# the public op's argument checks (before any backend runs)
# ------------------------------------------------------------------------------------------------


class TestBadInput:
    w = torch.randn(6, 5)
    m = torch.ones(6, 5, dtype=torch.bool)

    def test_shapes(self):
        with pytest.raises(ValueError, match="x: expected shape"):
            sk.sparse_linear(torch.randn(3, 4), self.w, None, self.m)
        with pytest.raises(ValueError, match="mask: expected the weight's shape"):
            sk.sparse_linear(torch.randn(3, 5), self.w, None, torch.ones(5, 6, dtype=torch.bool))
        with pytest.raises(ValueError, match="grad_mask: expected the weight's shape"):
            sk.sparse_linear(torch.randn(3, 5), self.w, None, self.m, torch.ones(6, 4, dtype=torch.bool))
        with pytest.raises(ValueError, match="bias: expected shape"):
            sk.sparse_linear(torch.randn(3, 5), self.w, torch.randn(5), self.m)
        with pytest.raises(ValueError, match="weight: expected a 2-D"):
            sk.sparse_linear(torch.randn(3, 5), torch.randn(6, 5, 1), None, self.m)

    def test_dtypes(self):
        with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
            sk.sparse_linear(torch.randn(3, 5, dtype=torch.float64), self.w, None, self.m)
        with pytest.raises(TypeError, match="mask: expected dtype torch.bool"):
            sk.sparse_linear(torch.randn(3, 5), self.w, None, self.m.float())
        with pytest.raises(TypeError, match="weight: expected a floating dtype"):
            sk.sparse_linear(torch.randn(3, 5), torch.ones(6, 5, dtype=torch.int64), None, self.m)
        with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
            sk.sparse_linear([[1.0] * 5], self.w, None, self.m)

    def test_device(self):
        meta_x = torch.empty(3, 5, device="meta")
        with pytest.raises(ValueError, match="x: expected a tensor on cpu"):
            sk.sparse_linear(meta_x, self.w, None, self.m)
        with pytest.raises(ValueError, match="mask: expected a tensor on cpu"):
            sk.sparse_linear(torch.randn(3, 5), self.w, None, torch.ones(6, 5, dtype=torch.bool, device="meta"))

    def test_layout_and_block(self):
        with pytest.raises(ValueError, match="layout"):
            sk.sparse_linear(torch.randn(3, 5), self.w, None, self.m, layout="csr")
        with pytest.raises(ValueError, match="block_size"):
            sk.sparse_linear(torch.randn(3, 5), self.w, None, self.m, layout="block", block_size=12)
        with pytest.raises(ValueError, match="block_size: required"):
            sk.sparse_linear(torch.randn(3, 5), self.w, None, self.m, layout="block")

    @pytest.mark.parametrize("block", [(16, 16), (16, 32)])
    def test_block_layout_needs_a_block_constant_mask(self, block):
        w, x = torch.randn(33, 47), torch.randn(5, 47)
        with pytest.raises(ValueError, match="constant"):
            sk.sparse_linear(x, w, None, make_mask(w.shape, "random", 0.5), layout="block", block_size=block)

    def test_sparsity_range(self):
        for bad in (1.0, -0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match="sparsity"):
                sk.SparseLinear(4, 4, sparsity=bad)
        with pytest.raises(TypeError, match="sparsity"):
            sk.SparseLinear(4, 4, sparsity="0.5")


# ------------------------------------------------------------------------------------------------
# the registered C++ ops: opcheck (schemas, fake tensors, autograd registration), argument checks
# ------------------------------------------------------------------------------------------------


def _cpp_linear_samples():
    """``(op name, arguments)`` per registered linear op, CSR and BSR metadata."""
    torch.manual_seed(1)
    n, k, m = 5, 20, 12
    csr = pattern_of(make_mask((m, k), "random", 0.3)).csr()
    bsr = pattern_of(make_block_mask((m, k), (16, 16), 1.0), "block", 16).bsr()
    x, w, dy = torch.randn(n, k), torch.randn(m, k), torch.randn(n, m)
    return {
        "fwd-csr": ("linear_fwd", (x, w, torch.randn(m), csr.crow_indices, csr.col_indices, [1, 1])),
        "fwd-bsr": ("linear_fwd", (x, w, None, bsr.crow_indices, bsr.col_indices, list(bsr.block))),
        "dx-csr": ("linear_dx", (dy, w, csr.ccol_indices, csr.row_indices, [1, 1])),
        "dw-csr": ("linear_dw", (dy, x, csr.crow_indices, csr.col_indices, [1, 1])),
    }


@requires_cpp
@pytest.mark.parametrize("sample", list(_cpp_linear_samples().items()), ids=lambda s: s[0])
def test_cpp_opcheck(sample):
    name, args = sample[1]
    torch.library.opcheck(getattr(torch.ops.sparsekern, name).default, args)


@requires_cpp
def test_cpp_ops_reject_bad_input():
    """Bad arguments raise a clear error naming them (never a crash)."""
    op = torch.ops.sparsekern.linear_fwd
    csr = pattern_of(make_mask((6, 10), "random", 0.5)).csr()
    x, w, crow, col = torch.randn(4, 10), torch.randn(6, 10), csr.crow_indices.clone(), csr.col_indices.clone()
    with pytest.raises(RuntimeError, match="x: expected dtype float32, float64 or bfloat16"):
        op(x.long(), w, None, crow, col, [1, 1])
    with pytest.raises(RuntimeError, match=r"x: expected dtype torch.float32|x: expected dtype Float"):
        op(x.double(), w, None, crow, col, [1, 1])
    # meta tensors route to the fake kernel: shapes only, no data touched
    assert op(x.to("meta"), w.to("meta"), None, crow.to("meta"), col.to("meta"), [1, 1]).shape == (4, 6)
    with pytest.raises(RuntimeError, match="weight: expected shape"):
        op(x, torch.randn(6, 11), None, crow, col, [1, 1])
    with pytest.raises(RuntimeError, match="bias: expected shape"):
        op(x, w, torch.randn(5), crow, col, [1, 1])
    with pytest.raises(RuntimeError, match="crow_indices: expected dtype int32"):
        op(x, w, None, crow.long(), col, [1, 1])
    with pytest.raises(RuntimeError, match="col_indices: expected a contiguous tensor"):
        op(x, w, None, crow, torch.stack([col, col], 1)[:, 0], [1, 1])
    with pytest.raises(RuntimeError, match="crow_indices: expected 7 entries"):
        op(x, w, None, crow[:-1].contiguous(), col, [1, 1])
    bad = col.clone()
    bad[0] = 10
    with pytest.raises(RuntimeError, match=r"col_indices: entries must lie in \[0, 10\)"):
        op(x, w, None, crow, bad, [1, 1])
    badp = crow.clone()
    badp[2], badp[3] = badp[3], badp[2] - 1
    with pytest.raises(RuntimeError, match="crow_indices"):
        op(x, w, None, badp, col, [1, 1])
    with pytest.raises(RuntimeError, match="block: expected positive sides"):
        op(x, w, None, crow, col, [0, 1])
    with pytest.raises(RuntimeError, match="dy: expected shape"):
        torch.ops.sparsekern.linear_dx(torch.randn(4, 7), w, crow, col, [1, 1])
    with pytest.raises(RuntimeError, match="x: expected 4 rows"):
        torch.ops.sparsekern.linear_dw(torch.randn(4, 6), torch.randn(3, 10), crow, col, [1, 1])


# ------------------------------------------------------------------------------------------------
# the Triton launchers' argument checks
# ------------------------------------------------------------------------------------------------


@requires_triton
def test_triton_launchers_reject_bad_arguments_naming_them():
    from sparsekern.kernels.triton.bsr import bsr_linear_dw, bsr_linear_fwd
    from sparsekern.kernels.triton.csr import csr_linear_dx, csr_linear_fwd

    mask = make_block_mask((32, 48), (16, 16), 0.5)
    bmeta = Pattern(mask, "block", (16, 16)).bsr()
    cmeta = Pattern(mask).csr()
    w, x = torch.randn(32, 48), torch.randn(4, 48)
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        bsr_linear_fwd(x.double(), w, None, bmeta)
    with pytest.raises(ValueError, match="x: expected a contiguous tensor"):
        bsr_linear_fwd(torch.randn(48, 4).t(), w, None, bmeta)
    with pytest.raises(ValueError, match=r"x: expected shape \[N, 48\]"):
        csr_linear_fwd(torch.randn(4, 47), w, None, cmeta)
    with pytest.raises(TypeError, match="meta: expected a BSRMeta"):
        bsr_linear_fwd(x, w, None, cmeta)
    with pytest.raises(TypeError, match="meta: expected a CSRMeta"):
        csr_linear_fwd(x, w, None, bmeta)
    with pytest.raises(ValueError, match=r"meta: describes a \(32, 48\) matrix"):
        csr_linear_dx(torch.randn(4, 16), torch.randn(16, 48), cmeta)
    with pytest.raises(TypeError, match="weight: expected float32, float16 or bfloat16"):
        bsr_linear_fwd(x.int(), w.int(), None, bmeta)
    with pytest.raises(ValueError, match=r"dy: expected 4 rows"):
        bsr_linear_dw(torch.randn(5, 32), x, bmeta)
    with pytest.raises(ValueError, match="bias: expected a 1-D tensor"):
        bsr_linear_fwd(x, w, torch.randn(32, 1), bmeta)
