"""The compiled (GPU) path builds, without a GPU: each Triton kernel is compiled ahead of time for
an NVIDIA target (sm_80 and sm_90) with Triton's bundled ptxas, in a subprocess with the
interpreter off.  The checks read the generated IR: the block kernels multiply on tensor cores
(``mma`` / ``warp_group_dot``) and their loops are software-pipelined (asynchronous copies into
shared memory), which is where their speed comes from.  This does not run a kernel; the numerical
checks are the interpreter tests and, on a GPU, the ``cuda`` variants.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="the triton backend needs the triton package (pip install .[triton])")

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
