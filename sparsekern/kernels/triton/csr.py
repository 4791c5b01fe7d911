"""Unstructured (CSR) Triton kernels for ``y = x (W⊙M)ᵀ`` and its gradients.

The weight stays in its dense ``[M, K]`` storage; :class:`~sparsekern.formats.CSRMeta` lists the
entries that exist, and the kernels read only those.

* :func:`csr_linear_fwd` ``y  = x (W⊙M)ᵀ (+ b)``: SpMM (``_csr_spmm_kernel``) over the rows of ``W``;
* :func:`csr_linear_dx`  ``dx = dy (W⊙M)``: the same SpMM over the columns of ``W``
  (the transposed metadata), so every output element has one owner: no atomics;
* :func:`csr_linear_dw`  ``dW = (dyᵀ x) ⊙ G``: SDDMM (``_csr_sddmm_kernel``) on the entries of
  ``G`` only, exact zeros elsewhere.

Layout.  The SpMM gathers, for each stored entry ``(r, c)``, a run of the dense operand along the
batch; the dense operand is therefore transposed once to ``[C, N]`` so those runs are contiguous
(coalesced), and the output is produced as ``[R, N]`` and transposed back.  Products are fp32 FMAs
(no tensor cores: an unstructured row shares no columns with its neighbours).

Load balance.  Rows of very different length are sorted by length, longest first (cached with the
metadata); a program takes ``BLOCK_R`` consecutive rows of that order -- rows of similar length,
so few lanes idle -- and the longest programs are scheduled first.  The SDDMM splits the stored
entries into equal chunks whatever the row lengths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...formats import CSRMeta
from ._launch import Tuned, acc_dtype, cdiv, check_dtype, check_operand, empty, pow2
from .bsr import walk_orders

__all__ = ["csr_linear_fwd", "csr_linear_dx", "csr_linear_dw"]


# ------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------


@triton.jit
def _csr_spmm_kernel(
    bt_ptr,  # [C, N] dense operand, transposed, contiguous
    w_ptr,  # dense weight storage
    bias_ptr,  # [R] or dummy
    out_ptr,  # [R, N], contiguous (the caller transposes)
    ptr_ptr,  # [R + 1] row pointers (CSR, or CSC for the input gradient)
    idx_ptr,  # [nnz] reduction index of each entry
    order_ptr,  # [R] rows, longest first
    N,
    R,
    stride_wr,  # weight value of entry (r, c) at w_ptr + r * stride_wr + c * stride_wc
    stride_wc,
    n_hint,  # N rounded up to a power of two: the tuning key, so a new batch size does not re-tune
    len_hint,  # mean row length, a power of two: also only a tuning key (denser rows want other tiles)
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UNROLL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,  # accumulator dtype: fp32 (fp64 for fp64 operands)
):
    i_pid = tl.program_id(0)
    n_tiles_r = tl.cdiv(R, BLOCK_R)
    # row groups vary fastest: one batch tile of the operand stays hot in L2 while all rows use it
    i_r = i_pid % n_tiles_r
    i_n = i_pid // n_tiles_r
    o_q = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_q = o_q < R
    o_row = tl.load(order_ptr + o_q, mask=m_q, other=0).to(tl.int64)
    o_start = tl.load(ptr_ptr + o_row, mask=m_q, other=0)
    o_len = tl.load(ptr_ptr + o_row + 1, mask=m_q, other=0) - o_start
    max_len = tl.max(o_len, axis=0)
    o_n = (i_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_n = o_n < N

    # [BLOCK_R, BLOCK_N]
    b_acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=ACC)
    for i_t in range(0, max_len, UNROLL):
        for i_u in tl.static_range(UNROLL):
            m_t = (i_t + i_u) < o_len
            o_col = tl.load(idx_ptr + o_start + i_t + i_u, mask=m_t, other=0).to(tl.int64)
            # [BLOCK_R]
            b_w = tl.load(w_ptr + o_row * stride_wr + o_col * stride_wc, mask=m_t, other=0.0).to(ACC)
            # [BLOCK_R, BLOCK_N]: one contiguous run of the operand per row
            b_b = tl.load(bt_ptr + o_col[:, None] * N + o_n[None, :], mask=m_t[:, None] & m_n[None, :], other=0.0)
            b_acc += b_w[:, None] * b_b.to(ACC)
    if HAS_BIAS:
        b_acc += tl.load(bias_ptr + o_row, mask=m_q, other=0.0).to(ACC)[:, None]
    # a row without entries keeps b_acc at zero: it is written as zeros (or the bias)
    tl.store(
        out_ptr + o_row[:, None] * N + o_n[None, :],
        b_acc.to(out_ptr.dtype.element_ty),
        mask=m_q[:, None] & m_n[None, :],
    )


@triton.jit
def _csr_sddmm_kernel(
    at_ptr,  # [M, N] = dyᵀ, contiguous
    bt_ptr,  # [K, N] = xᵀ, contiguous
    out_ptr,  # [M, K], zero-initialised
    rows_ptr,  # [nnz] row of each entry (CSR order)
    cols_ptr,  # [nnz] column of each entry
    nnz,
    N,
    K,
    n_hint,  # tuning keys only: N and nnz rounded up to powers of two, so a mask update does not re-tune
    nnz_hint,
    BLOCK_Z: tl.constexpr,  # entries per program
    BLOCK_N: tl.constexpr,  # reduction step over the batch
    ACC: tl.constexpr,
):
    i_pid = tl.program_id(0)
    o_z = (i_pid * BLOCK_Z + tl.arange(0, BLOCK_Z)).to(tl.int64)
    m_z = o_z < nnz
    o_row = tl.load(rows_ptr + o_z, mask=m_z, other=0).to(tl.int64)
    o_col = tl.load(cols_ptr + o_z, mask=m_z, other=0).to(tl.int64)

    # [BLOCK_Z, BLOCK_N]: reduced over the batch once at the end
    b_acc = tl.zeros((BLOCK_Z, BLOCK_N), dtype=ACC)
    for i_n in range(0, tl.cdiv(N, BLOCK_N)):
        o_n = (i_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m = m_z[:, None] & (o_n < N)[None, :]
        b_a = tl.load(at_ptr + o_row[:, None] * N + o_n[None, :], mask=m, other=0.0)
        b_b = tl.load(bt_ptr + o_col[:, None] * N + o_n[None, :], mask=m, other=0.0)
        b_acc += b_a.to(ACC) * b_b.to(ACC)
    # [BLOCK_Z]
    b_res = tl.sum(b_acc, axis=1)
    tl.store(out_ptr + o_row * K + o_col, b_res.to(out_ptr.dtype.element_ty), mask=m_z)


# ------------------------------------------------------------------------------------------
# tuning spaces
# ------------------------------------------------------------------------------------------


def _csr_spmm_configs():
    # (BLOCK_R, BLOCK_N, UNROLL, warps, stages)
    space = [
        (8, 128, 2, 4, 1),
        (16, 64, 2, 4, 1),
        (4, 256, 2, 4, 1),
        (8, 64, 4, 4, 1),
        (16, 128, 1, 8, 1),
        (32, 64, 1, 8, 1),
        (4, 128, 4, 4, 1),
        (2, 256, 4, 4, 1),
        (32, 128, 1, 8, 1),
    ]
    return [triton.Config(dict(BLOCK_R=r, BLOCK_N=n, UNROLL=u), num_warps=w, num_stages=s) for r, n, u, w, s in space]


def _csr_sddmm_configs():
    # (BLOCK_Z, BLOCK_N, warps)
    space = [(32, 128, 4), (64, 64, 4), (16, 256, 4), (64, 128, 8), (128, 32, 4), (32, 64, 4), (8, 256, 4)]
    return [triton.Config(dict(BLOCK_Z=z, BLOCK_N=n), num_warps=w, num_stages=2) for z, n, w in space]


_csr_spmm_tuned = Tuned(
    _csr_spmm_kernel,
    _csr_spmm_configs(),
    key=["n_hint", "R", "len_hint"],
    interpret_config=dict(BLOCK_R=16, BLOCK_N=32, UNROLL=2),
)
_csr_sddmm_tuned = Tuned(
    _csr_sddmm_kernel,
    _csr_sddmm_configs(),
    key=["n_hint", "nnz_hint", "K"],
    interpret_config=dict(BLOCK_Z=64, BLOCK_N=32),
)


# ------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------


def _check_meta(meta: CSRMeta, shape) -> None:
    if not isinstance(meta, CSRMeta):
        raise TypeError(f"meta: expected a CSRMeta (Pattern.csr()), got {type(meta).__name__}")
    if tuple(meta.shape) != tuple(shape):
        raise ValueError(f"meta: describes a {tuple(meta.shape)} matrix, expected {tuple(shape)}")


def _csr_spmm_launch(b, weight, bias, ptr, idx, order, R, nnz, stride_wr, stride_wc, config):
    """``out[n, r] = Σ_{entries (r, c)} W(r, c) b[n, c]`` for ``b [N, C]``; returns ``[N, R]``."""
    N = b.shape[0]
    if N == 0 or R == 0:
        return empty((N, R), dtype=b.dtype, device=b.device)
    bt = b.t().contiguous()
    out_t = empty((R, N), dtype=b.dtype, device=b.device)

    def grid(m):
        return (cdiv(R, m["BLOCK_R"]) * cdiv(N, m["BLOCK_N"]),)

    args = dict(
        bt_ptr=bt,
        w_ptr=weight,
        bias_ptr=bias if bias is not None else out_t,
        out_ptr=out_t,
        ptr_ptr=ptr,
        idx_ptr=idx,
        order_ptr=order,
        N=N,
        R=R,
        stride_wr=stride_wr,
        stride_wc=stride_wc,
        n_hint=pow2(N),
        len_hint=pow2(max(1, nnz // max(R, 1))),
        HAS_BIAS=bias is not None,
        ACC=acc_dtype(b.dtype),
    )
    _csr_spmm_tuned(grid, args, config)
    return out_t.t().contiguous()


def csr_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    meta: CSRMeta,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """``y = x (W⊙M)ᵀ + b`` reading only the entries of ``meta``.

    Args:
        x: ``[N, K]`` contiguous.
        weight: ``[M, K]`` contiguous dense storage.
        bias: ``[M]`` or ``None``.
        meta: CSR metadata of ``M`` (``Pattern.csr()``).
        config: fixed meta-parameters (``BLOCK_R``, ``BLOCK_N``, ``UNROLL``, optional
            ``num_warps`` / ``num_stages``) instead of autotuning.

    Returns:
        ``[N, M]``; rows of ``W`` without entries give zeros (plus the bias).
    """
    check_dtype(weight.dtype, "weight")
    check_operand(weight, "weight", dim=2, dtype=weight.dtype, device=weight.device)
    check_operand(x, "x", dim=2, dtype=weight.dtype, device=weight.device)
    if bias is not None:
        check_operand(bias, "bias", dim=1, dtype=weight.dtype, device=weight.device)
    _check_meta(meta, weight.shape)
    M, K = weight.shape
    if x.shape[1] != K:
        raise ValueError(f"x: expected shape [N, {K}], got {tuple(x.shape)}")
    orders = walk_orders(meta)
    return _csr_spmm_launch(
        x,
        weight,
        bias,
        meta.crow_indices,
        meta.col_indices,
        orders["row_order"],
        M,
        meta.nnz,
        weight.stride(0),
        1,
        config,
    )


def csr_linear_dx(
    dy: torch.Tensor,
    weight: torch.Tensor,
    meta: CSRMeta,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """``dx = dy (W⊙M)`` over the columns of ``W`` (transposed metadata), no atomics.

    Args:
        dy: ``[N, M]`` contiguous; weight: ``[M, K]``; meta: CSR metadata of ``M``.

    Returns:
        ``[N, K]``; columns of ``W`` without entries give zeros.
    """
    check_dtype(weight.dtype, "weight")
    check_operand(weight, "weight", dim=2, dtype=weight.dtype, device=weight.device)
    check_operand(dy, "dy", dim=2, dtype=weight.dtype, device=weight.device)
    _check_meta(meta, weight.shape)
    M, K = weight.shape
    if dy.shape[1] != M:
        raise ValueError(f"dy: expected shape [N, {M}], got {tuple(dy.shape)}")
    orders = walk_orders(meta)
    return _csr_spmm_launch(
        dy,
        weight,
        None,
        meta.ccol_indices,
        meta.row_indices,
        orders["col_order"],
        K,
        meta.nnz,
        1,
        weight.stride(0),
        config,
    )


def csr_linear_dw(
    dy: torch.Tensor,
    x: torch.Tensor,
    meta: CSRMeta,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """``dW = (dyᵀ x) ⊙ G`` on the entries of ``meta`` (the gradient pattern) only.

    Args:
        dy: ``[N, M]``; x: ``[N, K]``, both contiguous; meta: CSR metadata of ``G``.

    Returns:
        ``[M, K]`` dense, exactly zero outside ``G``.
    """
    check_dtype(x.dtype, "x")
    check_operand(x, "x", dim=2, dtype=x.dtype, device=x.device)
    check_operand(dy, "dy", dim=2, dtype=x.dtype, device=x.device)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy: expected {x.shape[0]} rows (x.shape[0]), got shape {tuple(dy.shape)}")
    M, K = dy.shape[1], x.shape[1]
    _check_meta(meta, (M, K))
    out = torch.zeros((M, K), dtype=x.dtype, device=x.device)
    if meta.nnz == 0:
        return out
    N = x.shape[0]
    dyt = dy.t().contiguous()
    xt = x.t().contiguous()
    orders = walk_orders(meta)

    def grid(m):
        return (cdiv(meta.nnz, m["BLOCK_Z"]),)

    args = dict(
        at_ptr=dyt,
        bt_ptr=xt,
        out_ptr=out,
        rows_ptr=orders["row_ids"],
        cols_ptr=meta.col_indices,
        nnz=meta.nnz,
        N=N,
        K=K,
        n_hint=pow2(N),
        nnz_hint=pow2(meta.nnz),
        ACC=acc_dtype(x.dtype),
    )
    _csr_sddmm_tuned(grid, args, config)
    return out
