"""Triton sparse conv2d against the reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 first), on small shapes; with a GPU the same tests run on CUDA on larger ones.
"""

import importlib.util

import pytest
import torch

import sparsekern as sk
from sparsekern import pattern_of
from sparsekern._backends import ConvParams
from sparsekern.reference import conv2d_dw, conv2d_dx, conv2d_fwd
from sparsekern.testing import make_block_mask, make_mask

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
SCALE = 4 if CUDA else 1  # larger shapes on a GPU

# (N, C, O, H, W, k, stride, padding, dilation)
SHAPES = [
    pytest.param((2, 20, 18, 7, 6, 3, 1, 1, 1), id="odd-hw-pad1"),
    pytest.param((1, 17, 33, 9, 8, 3, 2, 1, 1), id="stride2-off-by-one-channels"),
    pytest.param((2, 16, 16, 8, 7, 3, 1, 2, 2), id="dilation2"),
    pytest.param((2, 24, 20, 5, 5, 1, 1, 0, 1), id="1x1"),
    pytest.param((1, 16, 16, 6, 6, 3, 2, 0, 1), id="stride2-nopad"),
]


@pytest.fixture(autouse=True)
def _nan_outputs():
    """Fill outputs the kernels must overwrite with NaN, so an unwritten element fails the test."""
    from sparsekern.kernels.triton import _launch

    old = _launch.FILL_OUTPUTS_WITH_NAN
    _launch.FILL_OUTPUTS_WITH_NAN = True
    yield
    _launch.FILL_OUTPUTS_WITH_NAN = old


def _inputs(shape, dtype, channels_last=False):
    n, c, o, h, w, k, s, p, d = shape
    x = torch.randn(n * SCALE, c, h * SCALE, w * SCALE, dtype=dtype, device=DEV)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    wt = torch.randn(o, c, k, k, dtype=dtype, device=DEV)
    b = torch.randn(o, dtype=dtype, device=DEV)
    return x, wt, b, ConvParams((s, s), (p, p), (d, d), 1)


def _reference(x, w, b, m, g, conv, dy):
    xd, wd, bd, dyd = (t.double() for t in (x, w, b, dy))
    y = conv2d_fwd(xd, wd, bd, m, conv)
    dx = conv2d_dx(dyd, wd, m, tuple(x.shape), conv)
    dw = conv2d_dw(dyd, xd, g, tuple(w.shape), conv)
    return y, dx, dw


def _tol(dtype, ref):
    if dtype == torch.float64:
        return dict(atol=1e-9, rtol=1e-9)
    if dtype == torch.float32:
        return dict(atol=1e-4 * max(1.0, ref.abs().max().item()) ** 0.5, rtol=1e-4)
    return dict(atol=5e-2 * max(1.0, ref.abs().max().item()), rtol=5e-2)


def _check(name, got, ref, dtype):
    assert not torch.isnan(got).any(), f"{name}: unwritten (NaN) elements"
    torch.testing.assert_close(got.double(), ref, **_tol(dtype, ref), msg=name)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["unstructured", "block"])
def test_conv2d_fwd_dx_dw_match_reference(shape, layout):
    from sparsekern.kernels.triton import conv as tc

    dtype = torch.float32
    x, w, b, conv = _inputs(shape, dtype)
    if layout == "block":
        m = make_block_mask(w.shape, (16, 16), 0.6, device=DEV, empty_block_rows=True)
        meta = pattern_of(m, "block", 16).bsr()
    else:
        m = make_mask(w.shape, "empty_rows", 0.4, device=DEV)
        meta = pattern_of(m).csr()
    g = m & (torch.rand(w.shape, device=DEV) < 0.5)  # gradient mask != weight mask: unstructured
    gmeta = pattern_of(g).csr()
    y_ref = conv2d_fwd(x.double(), w.double(), b.double(), m, conv)
    dy = torch.randn(y_ref.shape, dtype=dtype, device=DEV)
    y_ref, dx_ref, dw_ref = _reference(x, w, b, m, g, conv, dy)
    if layout == "block":
        y = tc.bsr_conv2d_fwd(x, w, b, meta, conv, precision="ieee")
        dx = tc.bsr_conv2d_dx(dy, w, meta, tuple(x.shape), conv, precision="ieee")
        dw_full = tc.bsr_conv2d_dw(dy, x, meta, tuple(w.shape), conv, precision="ieee")
        _check("dw (block G = M)", dw_full, conv2d_dw(dy.double(), x.double(), m, tuple(w.shape), conv), dtype)
    else:
        y = tc.csr_conv2d_fwd(x, w, b, meta, conv)
        dx = tc.csr_conv2d_dx(dy, w, meta, tuple(x.shape), conv)
    dw = tc.csr_conv2d_dw(dy, x, gmeta, tuple(w.shape), conv)
    _check("y", y, y_ref, dtype)
    _check("dx", dx, dx_ref, dtype)
    _check("dw", dw, dw_ref, dtype)
    assert torch.all(dw[~g] == 0)


@pytest.mark.parametrize("layout", ["unstructured", "block"])
@pytest.mark.parametrize("kind", ["dense", "empty"])
def test_conv2d_density_zero_and_one(layout, kind):
    from sparsekern.kernels.triton import conv as tc

    x, w, b, conv = _inputs((1, 16, 16, 5, 6, 3, 1, 1, 1), torch.float32)
    m = make_mask(w.shape, kind)
    dy = torch.randn(1 * SCALE, 16, 5 * SCALE, 6 * SCALE, device=DEV)
    y_ref, dx_ref, dw_ref = _reference(x, w, b, m, m, conv, dy)
    if layout == "block":
        meta = pattern_of(m, "block", 16).bsr()
        y = tc.bsr_conv2d_fwd(x, w, b, meta, conv, precision="ieee")
        dx = tc.bsr_conv2d_dx(dy, w, meta, tuple(x.shape), conv, precision="ieee")
        dw = tc.bsr_conv2d_dw(dy, x, meta, tuple(w.shape), conv, precision="ieee")
    else:
        meta = pattern_of(m).csr()
        y = tc.csr_conv2d_fwd(x, w, b, meta, conv)
        dx = tc.csr_conv2d_dx(dy, w, meta, tuple(x.shape), conv)
        dw = tc.csr_conv2d_dw(dy, x, meta, tuple(w.shape), conv)
    for name, got, ref in (("y", y, y_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref)):
        _check(name, got, ref, torch.float32)


@pytest.mark.parametrize("layout", ["unstructured", "block"])
def test_conv2d_channels_last_input_and_output(layout):
    from sparsekern.kernels.triton import conv as tc

    x, w, b, conv = _inputs((2, 16, 16, 6, 5, 3, 2, 1, 1), torch.float32, channels_last=True)
    m = make_block_mask(w.shape, (16, 16), 1.0) if layout == "block" else make_mask(w.shape, "random", 0.5)
    if layout == "block":
        y = tc.bsr_conv2d_fwd(x, w, b, pattern_of(m, "block", 16).bsr(), conv, precision="ieee")
    else:
        y = tc.csr_conv2d_fwd(x, w, b, pattern_of(m).csr(), conv)
    assert y.is_contiguous(memory_format=torch.channels_last)
    _check("y", y, conv2d_fwd(x.double(), w.double(), b.double(), m, conv), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_bsr_conv2d_other_dtypes(dtype):
    if dtype == torch.float64 and CUDA:
        pytest.skip("float64 runs only under the interpreter")
    from sparsekern.kernels.triton import conv as tc

    x, w, b, conv = _inputs((1, 16, 32, 6, 6, 3, 1, 1, 1), dtype)
    m = make_block_mask(w.shape, (16, 16), 0.5)
    meta = pattern_of(m.to(DEV), "block", 16).bsr()
    y = tc.bsr_conv2d_fwd(x, w, b, meta, conv)
    _check("y", y, conv2d_fwd(x.double(), w.double(), b.double(), m.to(DEV), conv), dtype)


def test_conv2d_groups_rejected_with_reason():
    from sparsekern.kernels.triton import conv as tc

    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(4, 1, 3, 3)
    meta = pattern_of(torch.ones_like(w, dtype=torch.bool)).csr()
    with pytest.raises(ValueError, match="groups"):
        tc.csr_conv2d_fwd(x, w, None, meta, ConvParams((1, 1), (1, 1), (1, 1), 4))


def test_sparse_conv2d_on_triton_fwd_and_bwd():
    """sparse_conv2d(backend='triton') runs forward and backward on the Triton kernels."""
    ok, why = sk.get_backend("triton").supports(
        sk._backends.CallInfo("conv2d", torch.device(DEV), torch.float32, "unstructured", None, "unstructured",
                              ConvParams())
    )
    assert ok, why
    x = torch.randn(2 * SCALE, 16, 6, 7, device=DEV, requires_grad=True)
    w = torch.randn(16, 16, 3, 3, device=DEV, requires_grad=True)
    b = torch.randn(16, device=DEV, requires_grad=True)
    for layout, m in (("unstructured", make_mask(w.shape, "random", 0.3, device=DEV)),
                      ("block", make_block_mask(w.shape, (16, 16), 1.0, device=DEV))):
        outs = []
        for be in ("triton", "reference"):
            xx, ww, bb = (t.detach().clone().requires_grad_() for t in (x, w, b))
            y = sk.sparse_conv2d(xx, ww, bb, m, None, 2, 1, backend=be, layout=layout,
                                 block_size=16 if layout == "block" else None)
            y.backward(torch.ones_like(y))
            outs.append((y, xx.grad, ww.grad, bb.grad))
        for got, ref in zip(*outs):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
