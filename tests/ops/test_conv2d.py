"""``sparse_conv2d`` on every backend (depthwise included where a backend supports it): forward,
input and weight gradients against dense masked PyTorch (float64) over the shared case list,
``'same'`` / ``'valid'`` padding, float64 gradcheck, optimizers, the registered C++ conv ops
(opcheck, argument checks), and the public op's argument checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern._backends import ConvParams
from sparsekern.formats import pattern_of
from sparsekern.testing import CONFORMANCE, assert_close, conv_cases, make_mask
from tests.ops.helpers import (
    OPTIMIZERS,
    call,
    check_conv_case,
    check_frozen_weights_never_move,
    gradcheck,
)
from tests.support import over_cases, requires_cpp, requires_triton


@pytest.fixture
def conv_op(backend):
    """``sparse_conv2d`` on the backend under test; a refusal skips or fails by the support matrix."""

    def run(fn, dtype, weight_shape=None, groups=1):
        return call(backend, "conv2d", dtype, fn, weight_shape, groups)

    return run


# ------------------------------------------------------------------------------------------------
# against dense masked PyTorch
# ------------------------------------------------------------------------------------------------


@over_cases(conv_cases(CONFORMANCE))
def test_conv2d_matches_dense(backend, conv_op, case, dtype):
    """Both passes of a case: with a bias and its first gradient mask, without and its second
    (see ConvCase.grad_kinds); weights outside the mask are NaN."""
    check_conv_case(backend, case, dtype)


def test_padding_same_and_valid(backend, conv_op):
    dev = backend.device
    x = torch.randn(1, 2, 6, 7, device=dev)
    for k, d in ((3, 1), (4, 1), (3, 2), (2, 3)):  # even kernels: 'same' pads asymmetrically
        w = torch.randn(3, 2, k, k, device=dev)
        m = make_mask(w.shape, "random", 0.6, device=dev)
        for pad in ("same", "valid"):
            args = (x, w, None, m, None, 1, pad, d)
            y = conv_op(lambda args=args: sk.sparse_conv2d(*args, backend=backend.name), torch.float32)
            assert_close(y, F.conv2d(x, w * m, None, 1, pad, d))


# ------------------------------------------------------------------------------------------------
# float64 gradcheck on tiny shapes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", conv_cases("tiny"), ids=lambda c: c.id)
def test_gradcheck_conv2d(backend, conv_op, case):
    dev = backend.device
    conv = case.conv
    mask = case.weight_mask(case.weight_shape, dev)
    x = torch.randn(case.batch, case.in_channels, *case.hw, dtype=torch.float64, device=dev, requires_grad=True)
    w = torch.randn(case.weight_shape, dtype=torch.float64, device=dev, requires_grad=True)
    b = torch.randn(case.out_channels, dtype=torch.float64, device=dev, requires_grad=True)

    def fn(x, w, b):
        return sk.sparse_conv2d(
            x, w, b, mask, None, conv.stride, conv.padding, conv.dilation, conv.groups, backend=backend.name
        )

    conv_op(lambda: fn(x, w, b), torch.float64, case.weight_shape, case.groups)
    gradcheck(backend, fn, (x, w, b))


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_weights_outside_grad_mask_never_move(backend, conv_op, opt_name):
    conv = sk.SparseConv2d(3, 4, 3, padding=1, sparsity=0.5, backend=backend.name)
    check_frozen_weights_never_move(
        conv, lambda: torch.randn(2, 3, 5, 5, device=backend.device), backend, conv_op, opt_name
    )


# ------------------------------------------------------------------------------------------------
# the public op's argument checks (before any backend runs)
# ------------------------------------------------------------------------------------------------


def test_conv_args_are_checked():
    w = torch.randn(4, 3, 3, 3)
    m = torch.ones_like(w, dtype=torch.bool)
    with pytest.raises(ValueError, match="x: expected 3 input channels"):
        sk.sparse_conv2d(torch.randn(1, 4, 5, 5), w, None, m)
    with pytest.raises(ValueError, match="stride"):
        sk.sparse_conv2d(torch.randn(1, 3, 5, 5), w, None, m, None, 0)
    with pytest.raises(ValueError, match="padding"):
        sk.sparse_conv2d(torch.randn(1, 3, 5, 5), w, None, m, None, 1, "full")
    with pytest.raises(ValueError, match="x: spatial size"):
        sk.sparse_conv2d(torch.randn(1, 3, 2, 2), w, None, m)
    with pytest.raises(ValueError, match="x: expected a"):
        sk.sparse_conv2d(torch.randn(3, 5), w, None, m)
    with pytest.raises(ValueError, match="groups"):
        sk.sparse_conv2d(torch.randn(1, 3, 5, 5), w, None, m, None, 1, 0, 1, 3)


# ------------------------------------------------------------------------------------------------
# the registered C++ conv ops (groups=1 and depthwise): opcheck, argument checks
# ------------------------------------------------------------------------------------------------


@requires_cpp
def test_cpp_ops_reject_bad_input():
    xc, wc = torch.randn(1, 3, 2, 2), torch.randn(4, 3, 3, 3)
    cm = pattern_of(torch.ones(4, 3, 3, 3, dtype=torch.bool)).csr()
    with pytest.raises(RuntimeError, match="too small for the kernel"):
        torch.ops.sparsekern.conv2d_fwd(xc, wc, None, cm.crow_indices, cm.col_indices, [1, 1], [1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="stride: expected values >= 1"):
        torch.ops.sparsekern.conv2d_fwd(xc, wc, None, cm.crow_indices, cm.col_indices, [1, 1], [0, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="depthwise"):
        torch.ops.sparsekern.dwconv2d_fwd(
            torch.randn(1, 3, 5, 5),
            torch.randn(4, 1, 3, 3),
            None,
            cm.crow_indices[:5],
            cm.col_indices[:0],
            [1, 1],
            [1, 1],
            [1, 1],
        )


def _cpp_conv_samples():
    torch.manual_seed(1)
    xc, wc = torch.randn(2, 3, 6, 5), torch.randn(4, 3, 3, 3)
    cm = pattern_of(make_mask(wc.shape, "random", 0.4)).csr()
    sp = ([2, 1], [1, 1], [1, 1])
    dyc = torch.randn(2, 4, 3, 5)
    wd = torch.randn(6, 1, 3, 3)
    dm = pattern_of(make_mask(wd.shape, "random", 0.5)).csr()
    dyd = torch.randn(2, 6, 3, 5)
    samples = [
        ("conv2d_fwd", (xc, wc, torch.randn(4), cm.crow_indices, cm.col_indices, [1, 1], *sp)),
        ("conv2d_dx", (dyc, wc, cm.ccol_indices, cm.row_indices, [1, 1], [2, 3, 6, 5], *sp)),
        ("conv2d_dw", (dyc, xc, cm.crow_indices, cm.col_indices, [1, 1], [4, 3, 3, 3], *sp)),
        ("dwconv2d_fwd", (xc, wd, None, dm.crow_indices, dm.col_indices, *sp)),
        ("dwconv2d_dx", (dyd, wd, dm.crow_indices, dm.col_indices, [2, 3, 6, 5], *sp)),
        ("dwconv2d_dw", (dyd, xc, dm.crow_indices, dm.col_indices, [6, 1, 3, 3], *sp)),
    ]
    return [pytest.param(name, args, id=name) for name, args in samples]


@requires_cpp
@pytest.mark.parametrize("name,args", _cpp_conv_samples())
def test_cpp_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.sparsekern, name).default, args)


@requires_triton
def test_triton_conv_launcher_rejects_groups_with_reason():
    from sparsekern.kernels.triton import conv as tc

    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3)
    meta = pattern_of(torch.ones_like(w, dtype=torch.bool)).csr()
    with pytest.raises(ValueError, match="groups"):
        tc.csr_conv2d_fwd(x, w, None, meta, ConvParams((1, 1), (1, 1), (1, 1), 4))
