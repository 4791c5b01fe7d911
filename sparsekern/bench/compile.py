"""Ahead-of-time compilation of the Triton kernels for an NVIDIA target, without a GPU.

``python -m sparsekern.bench --compile-only 90`` compiles every kernel x tuning configuration x
block size x dtype for ``sm_90`` with Triton's bundled ptxas and checks that each fits the
target's shared memory; launches are specialised as on 16-byte aligned tensors with sizes that
are multiples of 16.  Needs Triton (not a GPU) and ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import time

__all__ = ["SHARED_MEMORY", "compile_kernel", "compile_kernels"]

# bytes of shared memory per block on each compute capability
SHARED_MEMORY = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# integer arguments a launch on aligned, 16-multiple sizes specialises as divisible by 16
_DIV16 = {"N", "R", "C", "M", "K", "stride_wr", "stride_wc"}


def compile_kernel(fn, types: dict, consts: dict, arch: int, warps: int, stages: int):
    """Compile the ``@triton.jit`` function ``fn`` for ``sm_<arch>``; returns Triton's compiled kernel.

    ``types``: Triton type of each runtime argument (``"*bf16"``, ``"i32"``, ...); ``consts``:
    the ``constexpr`` arguments' values.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(fn.arg_names)
        if n not in consts and (sig[n].startswith("*") or n in _DIV16)
    }
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))


def _block_kernels(p: str, blk: int):
    from sparsekern.kernels.triton import bsr

    spmm_types = dict(
        a_ptr=p,
        w_ptr=p,
        bias_ptr=p,
        out_ptr=p,
        ptr_ptr="*i32",
        idx_ptr="*i32",
        order_ptr="*i32",
        N="i32",
        R="i32",
        C="i32",
        n_rblocks="i32",
        stride_wr="i32",
        stride_wc="i32",
        n_hint="i32",
    )
    sddmm_types = dict(dy_ptr=p, x_ptr=p, out_ptr=p, rows_ptr="*i32", cols_ptr="*i32", N="i32", M="i32", K="i32",
                       n_hint="i32")  # fmt: skip
    return (
        (bsr._spmm_bsr_kernel, bsr._spmm_configs(), bsr._fit_spmm, spmm_types, dict(BR=blk, BC=blk, HAS_BIAS=True)),
        (bsr._sddmm_bsr_kernel, bsr._sddmm_configs(), bsr._fit_sddmm, sddmm_types, dict(BO=blk, BK=blk)),
    )


def _csr_kernels(p: str):
    from sparsekern.kernels.triton import csr

    spmm_types = dict(
        bt_ptr=p,
        w_ptr=p,
        bias_ptr=p,
        out_ptr=p,
        ptr_ptr="*i32",
        idx_ptr="*i32",
        order_ptr="*i32",
        N="i32",
        R="i32",
        stride_wr="i32",
        stride_wc="i32",
        n_hint="i32",
        len_hint="i32",
    )
    sddmm_types = dict(at_ptr=p, bt_ptr=p, out_ptr=p, rows_ptr="*i32", cols_ptr="*i32", nnz="i32", N="i32", K="i32",
                       n_hint="i32", nnz_hint="i32")  # fmt: skip
    return (
        (csr._spmm_csr_kernel, csr._spmm_configs(), spmm_types, dict(HAS_BIAS=True)),
        (csr._sddmm_csr_kernel, csr._sddmm_configs(), sddmm_types, {}),
    )


def compile_kernels(arch: int, quick: bool = False, log=print) -> int:
    """Compile every BSR / CSR kernel, tuning configuration, block size and dtype for ``sm_<arch>``.

    ``quick``: bf16 and fp32-with-TF32 at block 64 only.  Returns 1 when a kernel needs more
    shared memory than the target has, else 0.
    """
    import triton.language as tl

    limit = SHARED_MEMORY.get(arch, 99 * 1024)
    variants = [("bf16", "ieee"), ("fp32", "tf32")]
    if not quick:
        variants = [("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "ieee"), ("fp32", "tf32")]
    blocks = (64,) if quick else (16, 32, 64, 128)
    n = over = worst = 0
    t0 = time.time()
    for dt, prec in variants:
        p = "*" + dt
        for blk in blocks:
            for kernel, configs, fit, types, extra in _block_kernels(p, blk):
                seen = set()
                for cfg in configs:
                    meta = fit(dict(cfg.kwargs), extra)
                    key = (tuple(sorted(meta.items())), cfg.num_warps, cfg.num_stages)
                    if key in seen:
                        continue
                    seen.add(key)
                    consts = dict(extra, PRECISION=prec, UPCAST=False, ACC=tl.float32, **meta)
                    k = compile_kernel(kernel, types, consts, arch, cfg.num_warps, cfg.num_stages)
                    n += 1
                    worst = max(worst, k.metadata.shared)
                    if k.metadata.shared > limit:
                        over += 1
                        log(f"over the shared-memory limit: {kernel.__name__} {dt}/{prec} block {blk} {meta}")
        if prec != "tf32":  # the CSR kernels have no precision switch
            for kernel, configs, types, extra in _csr_kernels(p):
                for cfg in configs:
                    consts = dict(extra, ACC=tl.float32, **cfg.kwargs)
                    k = compile_kernel(kernel, types, consts, arch, cfg.num_warps, cfg.num_stages)
                    n += 1
                    worst = max(worst, k.metadata.shared)
        log(f"{dt}/{prec}: {n} compiled so far ({time.time() - t0:.0f} s)")
    log(f"sm_{arch}: compiled {n} kernel variants; largest shared memory {worst} bytes (limit {limit}); {over} over")
    return 1 if over else 0
