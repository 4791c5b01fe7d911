"""Sparse layers under ``torch.autocast`` follow ``nn.Linear`` / ``nn.Conv2d``: inputs and weights
cast to the autocast dtype, fp32 master weights, output in the autocast dtype, gradients back in
each parameter's dtype; values against the fp32 masked reference with that dtype's tolerance."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn

import sparsekern as sk
from tests.support import BF16, DTYPE_IDS, FP16, requires_cpp

# reference always; cpp where built (bf16 runs there, fp16 falls through to the reference)
BACKENDS = ["reference", None]
AUTOCAST = [pytest.param(dt, id=DTYPE_IDS[dt]) for dt in (BF16, FP16)]
# output / gradient tolerance against fp32 for one bf16 (fp16) rounding of inputs and outputs
TOL = {BF16: dict(atol=5e-2, rtol=5e-2), FP16: dict(atol=1e-2, rtol=1e-2)}


def _layers(kind: str):
    torch.manual_seed(0)
    if kind == "linear":
        dense = nn.Linear(40, 24)
        x = torch.randn(6, 40)
    else:
        dense = nn.Conv2d(5, 7, 3, padding=1, stride=2)
        x = torch.randn(2, 5, 9, 9)
    cls = sk.SparseLinear if kind == "linear" else sk.SparseConv2d
    return dense, cls.from_dense(dense, sparsity=0.6), x


def _run(module, x, dtype, autocast: bool):
    x = x.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        y = module(x)
    y.float().pow(2).sum().backward()
    return y, x.grad, module.weight.grad, module.bias.grad


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("dtype", AUTOCAST)
@pytest.mark.parametrize("be_name", BACKENDS, ids=lambda b: b or "auto")
def test_autocast_follows_dense(kind, dtype, be_name):
    dense, sparse, x = _layers(kind)
    sparse.backend = be_name
    # the dense layer on the masked weight: what the sparse one computes
    with torch.no_grad():
        dense.weight.mul_(sparse.weight_mask)
    y_d, dx_d, dw_d, db_d = _run(dense, x, dtype, True)
    y_s, dx_s, dw_s, db_s = _run(sparse, x, dtype, True)
    assert y_s.dtype == y_d.dtype == dtype
    for got, want in ((dx_s, dx_d), (dw_s, dw_d), (db_s, db_d)):
        assert got.dtype == want.dtype == torch.float32  # the parameters' (and input's) dtype
    assert sparse.weight.dtype == torch.float32  # master weights untouched
    ref = _run(sparse, x, torch.float32, False)  # the fp32 run of the same layer
    for name, got, want in zip(("y", "dx", "dw", "db"), (y_s, dx_s, dw_s, db_s), ref):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.float() / scale, want / scale, **TOL[dtype], msg=f"{kind} {name}")
    assert bool((dw_s[~sparse.grad_mask] == 0).all())


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_autocast_off_and_float64_untouched(kind):
    _, sparse, x = _layers(kind)
    sparse.double()
    with torch.autocast("cpu", dtype=BF16):
        y = sparse(x.double())
    assert y.dtype == torch.float64  # autocast leaves float64 alone, as for nn.Linear
    with torch.autocast("cpu", dtype=BF16, enabled=False):
        assert sparse.float()(x).dtype == torch.float32


@requires_cpp
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_bf16_autocast_runs_on_cpp(kind, monkeypatch):
    """Under bf16 autocast the automatic order picks ``cpp``, not the reference."""
    _, sparse, x = _layers(kind)
    seen = []
    module = importlib.import_module(f"sparsekern.ops.{kind}")
    real = module.select_backend

    def spy(info, backend=None):
        be = real(info, backend)
        seen.append((info.dtype, be.name))
        return be

    monkeypatch.setattr(module, "select_backend", spy)
    with torch.autocast("cpu", dtype=BF16):
        y = sparse(x)
    assert y.dtype == BF16 and seen == [(BF16, "cpp")]


@requires_cpp
@pytest.mark.parametrize("dx_in_place", [True, False], ids=["dx-in-place", "dx-cast"])
@pytest.mark.parametrize("layout", ["unstructured", "block"])
def test_cpp_reads_the_fp32_master_weight_under_bf16_autocast(layout, dx_in_place, monkeypatch):
    """cpp takes the float32 weight with bf16 data (no dense bf16 copy of the weight per call)
    and rounds each entry as the cast would: y, dx and dW are bit-identical to the same call on
    the weight cast to bf16 first."""
    from sparsekern.kernels.cpu import CppBackend

    seen = []
    orig = CppBackend.linear_fwd

    def spy(self, x, weight, bias, pattern):
        seen.append((x.dtype, weight.dtype))
        return orig(self, x, weight, bias, pattern)

    monkeypatch.setattr(CppBackend, "linear_fwd", spy)
    import sparsekern.ops.linear as linmod

    monkeypatch.setattr(linmod, "MIXED_DX_MIN", 0 if dx_in_place else 1 << 30)
    torch.manual_seed(1)
    kw = dict(layout="block", block_size=16) if layout == "block" else {}
    w = torch.randn(48, 64).requires_grad_()
    mask = (
        torch.rand(48, 64) < 0.3
        if layout == "unstructured"
        else (torch.rand(3, 4) < 0.5).repeat_interleave(16, 0).repeat_interleave(16, 1)
    )
    b = torch.randn(48).requires_grad_()
    x = torch.randn(37, 64).requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        y = sk.sparse_linear(x, w, b, mask, backend="cpp", **kw)
    assert seen == [(BF16, torch.float32)] and y.dtype == BF16
    dy = torch.randn(y.shape).to(BF16)
    y.backward(dy)
    w2 = w.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    wb = w2.to(BF16)  # the cast autocast would make, then the all-bf16 call
    y2 = sk.sparse_linear(x2.to(BF16), wb, b.detach().to(BF16), mask, backend="cpp", **kw)
    y2.backward(dy)
    assert torch.equal(y, y2)
    assert torch.equal(x.grad, x2.grad) and x.grad.dtype == torch.float32
    assert torch.equal(w.grad, w2.grad) and w.grad.dtype == torch.float32
    assert torch.all(w.grad[~mask] == 0)


@requires_cpp
def test_mixed_op_rejects_other_dtype_pairs():
    """Only bf16 data with a float32 weight is a mixed call; other pairs name the mismatch."""
    crow, col = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="x: expected dtype Float"):
        torch.ops.sparsekern.linear_fwd(x, torch.randn(1, 4), None, crow, col, [1, 1], None, None, 0)
