"""The `cuda` backend against the reference on a GPU (runs only where a CUDA device and the CUDA
build of sparsekern._C exist; on CPU-only machines the compile check in test_cuda_compile.py runs)."""

import pytest
import torch

import sparsekern as sk
from sparsekern.testing import linear_cases, make_block_mask, make_mask, tolerance

ok, why = (False, "no CUDA device") if not torch.cuda.is_available() else sk.get_backend("cuda").available()
pytestmark = pytest.mark.skipif(not ok, reason=f"cuda backend unavailable here: {why}")


@pytest.mark.parametrize("case", linear_cases(), ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_linear_fwd_dx_dw_matches_reference(case, dtype):
    dev = "cuda"
    x = torch.randn(case.batch, case.in_features, device=dev, dtype=dtype, requires_grad=True)
    w = torch.randn(case.out_features, case.in_features, device=dev, dtype=dtype, requires_grad=True)
    mask = make_mask(w.shape, case.kind, case.density, device=dev)
    gmask = mask & (torch.rand(w.shape, device=dev) < 0.5)
    outs = {}
    for be in ("cuda", "reference"):
        xx, ww = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        y = sk.sparse_linear(xx, ww, None, mask, gmask, backend=be)
        y.backward(torch.ones_like(y))
        outs[be] = (y, xx.grad, ww.grad)
    tol = tolerance(dtype) if dtype != torch.bfloat16 else {"atol": 1e-1, "rtol": 5e-2}
    for a, b in zip(outs["cuda"], outs["reference"]):
        torch.testing.assert_close(a, b, **tol)
    assert torch.all(outs["cuda"][2][~gmask] == 0)


@pytest.mark.parametrize("block", [(16, 16), (32, 16)])
def test_linear_fwd_dx_dw_block_matches_reference(block):
    dev = "cuda"
    w = torch.randn(70, 90, device=dev, requires_grad=True)
    mask = make_block_mask(w.shape, block, 0.4, device=dev, empty_block_rows=True)
    x = torch.randn(33, 90, device=dev, requires_grad=True)
    y = sk.sparse_linear(x, w, None, mask, backend="cuda", layout="block", block_size=block)
    y.sum().backward()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    yr = sk.sparse_linear(xr, wr, None, mask, backend="reference")
    yr.sum().backward()
    for a, b in ((y, yr), (x.grad, xr.grad), (w.grad, wr.grad)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
