"""What only the ``triton`` backend has: its verifier's reasons and switches (``fp32_precision``,
TF32), explicit launch configurations (sub-tiles, unrolls, swizzle groups), the walk orders
(heaviest block rows and longest rows first, cached with the metadata), which launcher runs the
weight gradient, the interpreter's fixed tuning, and the ahead-of-time compile for NVIDIA GPUs.
The op results themselves are checked in tests/ops/.

CPU variants run in Triton's interpreter (``interp`` ids; tests/conftest.py sets
``TRITON_INTERPRET=1`` when no GPU is present), ``cuda`` ids compiled on a GPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import sparsekern as sk
from sparsekern._backends import BackendError, CallInfo, ConvParams
from sparsekern.formats import Pattern, expand_block_mask, pattern_of
from sparsekern.reference import linear_dw, linear_dx, linear_fwd
from sparsekern.testing import assert_close, make_block_mask, make_mask
from tests.support import INTERPRETED, requires_gpu, requires_triton

pytestmark = requires_triton

needs_interp = pytest.mark.skipif(
    not INTERPRETED, reason="CPU variant: needs TRITON_INTERPRET=1 (conftest sets it when no GPU is present)"
)
needs_compiled = [requires_gpu, pytest.mark.skipif(INTERPRETED, reason="CUDA variant: needs compiled kernels")]


@pytest.fixture(autouse=True)
def _triton_test_env(monkeypatch):
    """IEEE fp32, no SPARSEKERN_BACKEND from outside, NaN-filled kernel outputs."""
    from sparsekern.kernels.triton import _launch

    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    monkeypatch.setattr(_launch, "FILL_OUTPUTS_WITH_NAN", True)
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(prev)


def _nan_outside(weight, mask):
    return weight.masked_fill(~mask, float("nan"))


# ------------------------------------------------------------------------------------------
# the verifier and the backend's switches
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


@needs_interp
def test_fp32_precision_is_ieee_unless_tf32_is_allowed():
    from sparsekern.kernels.triton._launch import resolve_precision

    assert resolve_precision(torch.float32, None) == "ieee"
    assert resolve_precision(torch.float32, "tf32") == "tf32"
    assert resolve_precision(torch.bfloat16, "tf32") == "ieee"  # half dtypes multiply natively
    torch.set_float32_matmul_precision("high")
    assert resolve_precision(torch.float32, None) == "tf32"
    with pytest.raises(ValueError, match="precision: expected one of"):
        resolve_precision(torch.float32, "fp8")


@needs_interp
def test_interpreter_tuning_is_a_single_fixed_config():
    """Under the interpreter nothing is autotuned (each launch is slow and timing meaningless)."""
    from sparsekern.kernels.triton import bsr, csr

    for tuned in (bsr._bsr_spmm_tuned, bsr._bsr_sddmm_tuned, csr._csr_spmm_tuned, csr._csr_sddmm_tuned):
        assert tuned._tuned is None and tuned.interpret_config


# ------------------------------------------------------------------------------------------
# which launcher computes the weight gradient
# ------------------------------------------------------------------------------------------


@needs_interp
@pytest.mark.parametrize("gkind", ["same", "blocks", "unstructured"])
def test_block_weight_gradient_runs_on_g_own_layout(monkeypatch, gkind):
    """A block-constant G (or G = M) keeps the block SDDMM; an unstructured G inside a block M
    runs the unstructured SDDMM on exactly G."""
    from sparsekern.kernels.triton import bsr, csr

    calls = []
    for module, name in ((bsr, "bsr_linear_dw"), (csr, "csr_linear_dw")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _r=real, _n=name, **kw: calls.append(_n) or _r(*a, **kw))
    m, k, block = 40, 48, (32, 16)
    mask = make_block_mask((m, k), block, 0.6)
    gmask = {
        "same": None,
        "blocks": mask & expand_block_mask(torch.rand(2, 3) < 0.5, block, (m, k)),
        "unstructured": mask & (torch.rand(m, k) < 0.5),
    }[gkind]
    x, w = torch.randn(6, k), torch.randn(m, k, requires_grad=True)
    y = sk.sparse_linear(x, w, None, mask, gmask, backend="triton", layout="block", block_size=block)
    y.sum().backward()
    assert calls == (["csr_linear_dw"] if gkind == "unstructured" else ["bsr_linear_dw"])
    assert_close(w.grad, linear_dw(torch.ones(6, m), x, mask if gmask is None else gmask))


# ------------------------------------------------------------------------------------------
# explicit launch configurations
# ------------------------------------------------------------------------------------------

# sub-tiles of 64/128 blocks along both sides, partial swizzle groups
BSR_CONFIGS = [
    (
        (50, 130, 70, (64, 64)),
        dict(BLOCK_N=16, BLOCK_R=16, BLOCK_C=32, GROUP_N=3),
        dict(BLOCK_M=16, BLOCK_K=32, BLOCK_N=16),
    ),
    (
        (9, 129, 131, (128, 128)),
        dict(BLOCK_N=16, BLOCK_R=64, BLOCK_C=32, GROUP_N=1),
        dict(BLOCK_M=64, BLOCK_K=32, BLOCK_N=16),
    ),
    (
        (37, 100, 66, (32, 64)),
        dict(BLOCK_N=16, BLOCK_R=32, BLOCK_C=16, GROUP_N=2),
        dict(BLOCK_M=32, BLOCK_K=16, BLOCK_N=32),
    ),
]


@needs_interp
@pytest.mark.parametrize(
    "shape,fwd_cfg,dw_cfg",
    BSR_CONFIGS,
    ids=[f"N{s[0]}-K{s[1]}-M{s[2]}-b{s[3][0]}x{s[3][1]}" for s, _, _ in BSR_CONFIGS],
)
def test_bsr_spmm_sddmm_subtile_configs_match_reference(shape, fwd_cfg, dw_cfg):
    from sparsekern.kernels.triton.bsr import bsr_linear_dw, bsr_linear_dx, bsr_linear_fwd

    n, k, m, block = shape
    mask = make_block_mask((m, k), block, 0.7)
    mask[: block[0]] = False  # an empty block row
    w, x, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(n, m)
    meta = Pattern(mask, "block", block).bsr()
    wn = _nan_outside(w, mask)
    assert_close(bsr_linear_fwd(x, wn, None, meta, config=fwd_cfg), linear_fwd(x, w, None, mask))
    bwd_cfg = dict(fwd_cfg, BLOCK_R=fwd_cfg["BLOCK_C"], BLOCK_C=fwd_cfg["BLOCK_R"])
    assert_close(bsr_linear_dx(dy, wn, meta, config=bwd_cfg), linear_dx(dy, w, mask))
    assert_close(bsr_linear_dw(dy, x, meta, config=dw_cfg), linear_dw(dy, x, mask))


@needs_interp
@pytest.mark.parametrize(
    "spmm_cfg,sddmm_cfg",
    [
        (dict(BLOCK_R=4, BLOCK_N=16, UNROLL=3), dict(BLOCK_Z=16, BLOCK_N=16)),
        (dict(BLOCK_R=2, BLOCK_N=32, UNROLL=1), dict(BLOCK_Z=128, BLOCK_N=64)),
    ],
    ids=["R4-N16-U3", "R2-N32-U1"],
)
def test_csr_spmm_sddmm_configs_match_reference(spmm_cfg, sddmm_cfg):
    """An unroll that does not divide the row lengths; more entries per program than exist."""
    from sparsekern.kernels.triton.csr import csr_linear_dw, csr_linear_dx, csr_linear_fwd

    n, k, m = 19, 23, 13
    mask = make_mask((m, k), "skewed")
    w, x, dy, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n, m), torch.randn(m)
    meta = Pattern(mask).csr()
    wn = _nan_outside(w, mask)
    assert_close(csr_linear_fwd(x, wn, b, meta, config=spmm_cfg), linear_fwd(x, w, b, mask))
    assert_close(csr_linear_dx(dy, wn, meta, config=spmm_cfg), linear_dx(dy, w, mask))
    assert_close(csr_linear_dw(dy, x, meta, config=sddmm_cfg), linear_dw(dy, x, mask))


# ------------------------------------------------------------------------------------------
# walk orders: heaviest block rows / longest rows first, cached with the metadata
# ------------------------------------------------------------------------------------------


@needs_interp
def test_bsr_block_rows_run_heaviest_first_and_orders_are_cached():
    from sparsekern.kernels.triton.bsr import walk_orders

    mask = make_block_mask((64, 80), (16, 16), 0.5)
    meta = pattern_of(mask, "block", 16).bsr().blocks
    orders = walk_orders(meta)
    lengths = (meta.crow_indices[1:] - meta.crow_indices[:-1])[orders["row_order"].long()]
    assert (lengths[:-1] >= lengths[1:]).all()
    clen = (meta.ccol_indices[1:] - meta.ccol_indices[:-1])[orders["col_order"].long()]
    assert (clen[:-1] >= clen[1:]).all()
    assert torch.equal(orders["row_ids"].long(), meta.row_ids())
    assert walk_orders(meta) is orders  # cached with the metadata
    mask[:16] = True  # a mask change rebuilds the metadata, and with it the orders
    assert walk_orders(pattern_of(mask, "block", 16).bsr().blocks) is not orders


@pytest.mark.parametrize(
    "device,shape",
    [
        pytest.param("cpu", (9, 45, 37), marks=needs_interp, id="interp-N9-K45-M37"),
        pytest.param("cuda", (1000, 2048, 1500), marks=needs_compiled, id="cuda-N1000-K2048-M1500"),
    ],
)
def test_csr_linear_rows_of_very_different_length(device, shape):
    from sparsekern.kernels.triton.bsr import walk_orders
    from sparsekern.kernels.triton.csr import csr_linear_dw, csr_linear_dx, csr_linear_fwd

    n, k, m = shape
    mask = make_mask((m, k), "skewed", device=device)
    w, x, dy = (torch.randn(*s, device=device) for s in ((m, k), (n, k), (n, m)))
    meta = Pattern(mask).csr()
    lengths = (meta.crow_indices[1:] - meta.crow_indices[:-1]).long()
    assert lengths.min() == 0 and lengths.max() == k  # as skewed as it gets
    order = walk_orders(meta)["row_order"].long()
    assert (lengths[order][:-1] >= lengths[order][1:]).all(), "rows must be scheduled longest first"
    wn = _nan_outside(w, mask)
    assert_close(csr_linear_fwd(x, wn, None, meta), linear_fwd(x, w, None, mask))
    assert_close(csr_linear_dx(dy, wn, meta), linear_dx(dy, w, mask))
    assert_close(csr_linear_dw(dy, x, meta), linear_dw(dy, x, mask))


# ------------------------------------------------------------------------------------------
# the compiled (GPU) path builds, without a GPU
# ------------------------------------------------------------------------------------------

# Each kernel is compiled ahead of time for an NVIDIA target (sm_80, sm_90) with Triton's bundled
# ptxas, in a subprocess with the interpreter off.  The checks read the generated IR: the block
# kernels multiply on tensor cores (``mma`` / ``warp_group_dot``) and their loops are
# software-pipelined (asynchronous copies into shared memory), which is where their speed comes
# from.  Nothing runs: the numerical checks are the op suites, in the interpreter or on a GPU.
_SCRIPT = textwrap.dedent(
    r"""
    import json, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sparsekern.kernels.triton import bsr, csr

    arch = int(sys.argv[1])
    target = GPUTarget("cuda", arch, 32)
    DIV16 = {"N", "R", "C", "M", "K", "stride_wr", "stride_wc"}

    def build(fn, types, consts, warps, stages):
        sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
        # as a launch on 16-byte aligned tensors with sizes that are multiples of 16 would specialise
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if n not in consts and (sig[n].startswith("*") or n in DIV16)}
        k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=target,
                           options=dict(num_warps=warps, num_stages=stages))
        ir = k.asm["ttgir"]
        return dict(shared=k.metadata.shared, tensor_cores=("warp_group_dot" in ir) or ("#mma" in ir),
                    pipelined=("async_copy_global_to_local" in ir) or ("async_tma_copy" in ir))

    out = {}
    for dt in ("bf16", "fp32"):
        p = "*" + dt
        prec = "tf32" if dt == "fp32" else "ieee"
        out[f"bsr_spmm_{dt}"] = build(bsr._bsr_spmm_kernel, dict(
            a_ptr=p, w_ptr=p, bias_ptr=p, out_ptr=p, ptr_ptr="*i32", idx_ptr="*i32", order_ptr="*i32",
            N="i32", R="i32", C="i32", n_rblocks="i32", stride_wr="i32", stride_wc="i32", n_hint="i32"),
            dict(BR=64, BC=64, HAS_BIAS=True, PRECISION=prec, UPCAST=False, ACC=tl.float32,
                 BLOCK_N=128, BLOCK_R=64, BLOCK_C=32, GROUP_N=8), 4, 3)
        out[f"bsr_sddmm_{dt}"] = build(bsr._bsr_sddmm_kernel, dict(
            dy_ptr=p, x_ptr=p, out_ptr=p, rows_ptr="*i32", cols_ptr="*i32", N="i32", M="i32", K="i32", n_hint="i32"),
            dict(BO=64, BK=64, PRECISION=prec, UPCAST=False, ACC=tl.float32, BLOCK_M=64, BLOCK_K=64, BLOCK_N=32), 4, 3)
        out[f"csr_spmm_{dt}"] = build(csr._csr_spmm_kernel, dict(
            bt_ptr=p, w_ptr=p, bias_ptr=p, out_ptr=p, ptr_ptr="*i32", idx_ptr="*i32", order_ptr="*i32",
            N="i32", R="i32", stride_wr="i32", stride_wc="i32", n_hint="i32", len_hint="i32"),
            dict(HAS_BIAS=True, ACC=tl.float32, BLOCK_R=8, BLOCK_N=128, UNROLL=2), 4, 1)
        out[f"csr_sddmm_{dt}"] = build(csr._csr_sddmm_kernel, dict(
            at_ptr=p, bt_ptr=p, out_ptr=p, rows_ptr="*i32", cols_ptr="*i32", nnz="i32", N="i32", K="i32",
            n_hint="i32", nnz_hint="i32"),
            dict(ACC=tl.float32, BLOCK_Z=32, BLOCK_N=128), 4, 2)
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("arch", [80, 90], ids=["sm80", "sm90"])
def test_kernels_compile_for_nvidia_gpus(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(arch)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(res) == {
        f"{k}_{dt}" for k in ("bsr_spmm", "bsr_sddmm", "csr_spmm", "csr_sddmm") for dt in ("bf16", "fp32")
    }
    smem_limit = {80: 163 * 1024, 90: 227 * 1024}[arch]
    for name, info in res.items():
        assert info["shared"] <= smem_limit, f"{name}: {info['shared']} bytes of shared memory"
    for dt in ("bf16", "fp32"):  # fp32 here is TF32, which runs on tensor cores too
        for k in ("bsr_spmm", "bsr_sddmm"):
            assert res[f"{k}_{dt}"]["tensor_cores"], f"{k}_{dt}: tl.dot did not lower to tensor-core MMA"
            assert res[f"{k}_{dt}"]["pipelined"], f"{k}_{dt}: the main loop is not software-pipelined"
