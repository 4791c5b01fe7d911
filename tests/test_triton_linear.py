"""``sparse_linear(..., backend="triton")`` forward and backward against the reference backend,
the module path, and the verifier's reasons.  CPU variants run in Triton's interpreter
(``interp`` ids); ``cuda`` ids are CUDA-only (larger shapes) and are skipped without a GPU.
"""

from __future__ import annotations

import re

import pytest
import torch

triton = pytest.importorskip("triton", reason="the triton backend needs the triton package (pip install .[triton])")

import sparsekern as sk  # noqa: E402
from sparsekern._backends import BackendError, CallInfo, ConvParams  # noqa: E402
from sparsekern.formats import expand_block_mask  # noqa: E402
from sparsekern.testing import assert_close, linear_cases, make_block_mask, make_mask  # noqa: E402

INTERP = bool(triton.knobs.runtime.interpret)
HAS_CUDA = torch.cuda.is_available()
needs_interp = pytest.mark.skipif(
    not INTERP, reason="CPU variant: needs TRITON_INTERPRET=1 (conftest sets it when no GPU is present)"
)
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA or INTERP, reason="CUDA-only variant: needs a CUDA device and compiled (not interpreted) kernels"
)


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(prev)


def _run(x, w, b, mask, gmask, backend, **kw):
    """Forward + backward with a fixed upstream gradient; returns (y, dx, dw, db)."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True) if b is not None else None
    y = sk.sparse_linear(x, w, b, mask, gmask, backend=backend, **kw)
    gen = torch.Generator(device="cpu").manual_seed(1)
    dy = torch.randn(y.shape, generator=gen).to(y)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, (b.grad if b is not None else None)


def _compare(got, ref, dtype, ref32=None, names=("y", "dx", "dw", "db")):
    """fp32/fp64: the dtype's tolerance against the reference backend.  fp16/bf16 (the rule of
    flash-attention's tests): the error against an fp32 run ``ref32`` (same inputs, upcast) is at
    most 2x the reference backend's own error in that dtype, with a floor of one unit in the last
    place of the largest value."""
    for i, (name, g, r) in enumerate(zip(names, got, ref)):
        if r is None:
            assert g is None
            continue
        assert not torch.isnan(g).any(), f"{name}: NaN"
        if dtype in (torch.float32, torch.float64):
            assert_close(g, r, msg=f"{name} differs from the reference backend")
            continue
        r32 = ref32[i].float()
        err = (g.float() - r32).abs().max().item()
        own = (r.float() - r32).abs().max().item()
        floor = torch.finfo(dtype).eps * max(1.0, r32.abs().max().item())
        assert err <= 2 * own + floor, f"{name}: error {err:.3g} > 2 x the reference's {own:.3g} + {floor:.3g}"


def _ref32(x, w, b, mask, gmask, **kw):
    """The reference backend in fp32 on the same (low-precision) inputs."""
    up = (t.float() if t is not None else None for t in (x, w, b))
    return _run(*up, mask, gmask, "reference", **kw)


# ------------------------------------------------------------------------------------------
# unstructured
# ------------------------------------------------------------------------------------------

_UNSTRUCT = {
    "cpu": [(c.batch, c.in_features, c.out_features, c.kind, c.density) for c in linear_cases()],
    "cuda": [(512, 768, 3072, "random", 0.1), (300, 1001, 257, "empty_rows", 0.2), (64, 128, 128, "dense", 1.0)],
}


def _unstruct_params():
    out = []
    for dev, marks, tag in (("cpu", needs_interp, "interp"), ("cuda", needs_cuda, "cuda")):
        for i, (n, k, m, kind, d) in enumerate(_UNSTRUCT[dev]):
            dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if dev == "cuda" or i in (1, 6) else [])
            for dt in dtypes:
                out.append(
                    pytest.param(
                        dev, (n, k, m, kind, d), dt, marks=marks, id=f"{tag}-N{n}-K{k}-M{m}-{kind}-{str(dt)[6:]}"
                    )
                )
    return out


@pytest.mark.parametrize("device,case,dtype", _unstruct_params())
def test_sparse_linear_unstructured_fwd_bwd(device, case, dtype):
    n, k, m, kind, density = case
    mask = make_mask((m, k), kind, density).to(device)
    gmask = mask & (torch.rand(m, k) < 0.5).to(device)
    w = torch.randn(m, k, dtype=dtype, device=device).masked_fill(~mask, float("nan"))
    x = torch.randn(n, k, dtype=dtype, device=device)
    b = torch.randn(m, dtype=dtype, device=device)
    got = _run(x, w, b, mask, gmask, "triton")
    ref = _run(x, w, b, mask, gmask, "reference")
    _compare(got, ref, dtype, _ref32(x, w, b, mask, gmask))
    assert (got[2][~gmask] == 0).all()


# ------------------------------------------------------------------------------------------
# block
# ------------------------------------------------------------------------------------------

# (N, K, M, block, density, empty block rows, gradient mask: "same" | "blocks" | "unstructured")
_BLOCK = {
    "cpu": [
        (5, 47, 33, 16, 0.5, False, "blocks"),
        (6, 48, 40, (32, 16), 0.6, True, "unstructured"),
        (4, 33, 31, (16, 32), 1.0, False, "same"),
        (3, 32, 32, 16, 0.0, False, "same"),
        (20, 64, 48, 16, 0.4, True, "blocks"),
    ],
    "cuda": [
        (1024, 768, 3072, 64, 0.1, False, "blocks"),
        (513, 1000, 700, (128, 64), 0.3, True, "unstructured"),
        (256, 512, 512, 32, 1.0, False, "same"),
    ],
}


def _block_params():
    out = []
    for dev, marks, tag in (("cpu", needs_interp, "interp"), ("cuda", needs_cuda, "cuda")):
        for i, case in enumerate(_BLOCK[dev]):
            dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if dev == "cuda" or i in (0, 1) else [])
            for dt in dtypes:
                n, k, m, blk, d, er, g = case
                cid = f"{tag}-N{n}-K{k}-M{m}-b{blk}-d{d}-{'emptyrows-' if er else ''}G{g}-{str(dt)[6:]}"
                out.append(pytest.param(dev, case, dt, marks=marks, id=cid))
    return out


def _spy(monkeypatch, module, name, calls):
    real = getattr(module, name)

    def wrapper(*a, **kw):
        calls.append(name)
        return real(*a, **kw)

    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize("device,case,dtype", _block_params())
def test_sparse_linear_block_fwd_bwd(device, case, dtype, monkeypatch):
    from sparsekern.kernels.triton import bsr, csr

    n, k, m, block, density, empty_rows, gkind = case
    bo, bk = (block, block) if isinstance(block, int) else block
    mask = make_block_mask((m, k), (bo, bk), density, empty_block_rows=empty_rows).to(device)
    if gkind == "same":
        gmask = None
    elif gkind == "blocks":  # a subset of the tiles: the gradient stays block-sparse
        tiles = torch.rand(-(-m // bo), -(-k // bk)) < 0.5
        gmask = mask & expand_block_mask(tiles, (bo, bk), (m, k)).to(device)
    else:  # not constant on tiles: the weight gradient runs the unstructured SDDMM on G
        gmask = mask & (torch.rand(m, k) < 0.5).to(device)
    calls = []
    _spy(monkeypatch, bsr, "bsr_linear_dw", calls)
    _spy(monkeypatch, csr, "csr_linear_dw", calls)

    w = torch.randn(m, k, dtype=dtype, device=device).masked_fill(~mask, float("nan"))
    x = torch.randn(n, k, dtype=dtype, device=device)
    b = torch.randn(m, dtype=dtype, device=device)
    kw = dict(layout="block", block_size=block)
    got = _run(x, w, b, mask, gmask, "triton", **kw)
    assert calls == (["csr_linear_dw"] if gkind == "unstructured" else ["bsr_linear_dw"])
    ref = _run(x, w, b, mask, gmask, "reference", **kw)
    _compare(got, ref, dtype, _ref32(x, w, b, mask, gmask, **kw))
    g = mask if gmask is None else gmask
    assert (got[2][~g] == 0).all()


@needs_interp
def test_sparse_linear_batched_input_and_no_bias():
    mask = make_block_mask((24, 40), (16, 16), 0.5)
    w, x = torch.randn(24, 40), torch.randn(2, 3, 40)
    for kw in (dict(layout="block", block_size=16), dict()):
        got = _run(x, w, None, mask, None, "triton", **kw)
        ref = _run(x, w, None, mask, None, "reference", **kw)
        assert got[0].shape == (2, 3, 24)
        _compare(got, ref, torch.float32)


@needs_interp
@pytest.mark.parametrize("layout", ["block", "unstructured"])
def test_gradcheck_sparse_linear_float64(layout):
    """float64 runs under the interpreter (fp64 accumulation), so the autograd wiring is checked
    numerically (fast mode: a few random directions instead of every element)."""
    if layout == "block":
        mask, kw = make_block_mask((20, 33), (16, 16), 0.6), dict(layout="block", block_size=16)
    else:
        mask, kw = make_mask((20, 33), "random", 0.4), {}
    w = torch.randn(20, 33, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 33, dtype=torch.float64, requires_grad=True)
    b = torch.randn(20, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return sk.sparse_linear(x, w, b, mask, backend="triton", **kw)

    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)


@needs_interp
def test_sparse_linear_module_trains_on_triton_via_env(monkeypatch):
    """``SPARSEKERN_BACKEND=triton`` routes a ``SparseLinear`` (fwd and bwd) to the kernels."""
    from sparsekern.kernels import triton as tk

    torch.manual_seed(0)
    layer = sk.SparseLinear(40, 24, sparsity=0.7)
    ref = sk.SparseLinear(40, 24)
    ref.load_state_dict(layer.state_dict())
    calls = []
    real_fwd, real_wg = tk.TritonBackend.linear_fwd, tk.TritonBackend.linear_dw
    monkeypatch.setattr(tk.TritonBackend, "linear_fwd", lambda s, *a: calls.append("fwd") or real_fwd(s, *a))
    monkeypatch.setattr(tk.TritonBackend, "linear_dw", lambda s, *a: calls.append("dw") or real_wg(s, *a))
    x = torch.randn(6, 40)
    monkeypatch.setenv("SPARSEKERN_BACKEND", "triton")
    layer(x).square().sum().backward()
    assert calls == ["fwd", "dw"]
    monkeypatch.setenv("SPARSEKERN_BACKEND", "reference")
    ref(x).square().sum().backward()
    assert_close(layer.weight.grad, ref.weight.grad)
    assert_close(layer.bias.grad, ref.bias.grad)
    assert (layer.weight.grad[~layer.grad_mask] == 0).all()


# ------------------------------------------------------------------------------------------
# the verifier
# ------------------------------------------------------------------------------------------


def _info(**kw):
    base = dict(
        op="linear", device=torch.device("cpu"), dtype=torch.float32, layout="block", block_size=(16, 16),
        grad_layout="block",
    )  # fmt: skip
    base.update(kw)
    return CallInfo(**base)


def test_verifier_states_why_a_call_is_refused(monkeypatch):
    from sparsekern.kernels import triton as tk

    be = tk.TritonBackend()
    assert be.available() == (True, "")
    cases = [
        (_info(op="conv2d", conv=ConvParams(groups=2), weight_shape=(4, 1, 3, 3)), "groups=2"),
        (_info(op="conv2d", conv=ConvParams(), block_size=(16, 20), weight_shape=(16, 16, 3, 3)), "input channels"),
        (_info(dtype=torch.int32), "dtype torch.int32"),
        (_info(block_size=(16, 48)), r"block size \(16, 48\)"),
        (_info(layout="diagonal"), "weight layout 'diagonal'"),
        (_info(device=torch.device("meta")), "device type 'meta'"),
    ]
    for info, why in cases:
        ok, reason = be.supports(info)
        assert not ok
        assert re.search(why, reason), reason
    # without the interpreter: CPU tensors and float64 are refused, each with its reason
    monkeypatch.setattr(tk, "_kernels_interpreted", lambda: None)
    monkeypatch.setattr(tk, "_interpret_requested", lambda: False)
    ok, reason = be.supports(_info())
    assert not ok and "TRITON_INTERPRET=1" in reason
    ok, reason = be.supports(_info(dtype=torch.float64))
    assert not ok and "float64" in reason and "interpreter" in reason
    monkeypatch.setattr(tk, "_kernels_interpreted", lambda: False)
    ok, reason = be.supports(_info())
    assert not ok and "already compiled for the GPU" in reason


def test_unavailable_without_triton(monkeypatch):
    import importlib.util

    from sparsekern.kernels import triton as tk

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    ok, reason = tk.TritonBackend().available()
    assert not ok and "triton is not installed" in reason


def test_explicit_backend_error_carries_the_reason():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3)
    with pytest.raises(BackendError, match="backend 'triton'.*groups=4"):
        sk.sparse_conv2d(x, w, None, torch.ones(4, 1, 3, 3, dtype=torch.bool), None, 1, 1, 1, 4, backend="triton")


def test_fp32_precision_argument_is_checked():
    from sparsekern.kernels import triton as tk

    assert tk.TritonBackend("tf32").fp32_precision == "tf32"
    with pytest.raises(ValueError, match="fp32_precision: expected"):
        tk.TritonBackend("bf16")
