"""Block-sparse (BSR) Triton kernels for ``y = x (W⊙M)ᵀ`` and its gradients.

The weight stays in its dense ``[M, K]`` storage; the block metadata (:class:`~sparsekern.formats.BSRMeta`)
says which ``bo x bk`` tiles exist, and the kernels read only those tiles.

* :func:`bsr_linear_fwd` ``y  = x (W⊙M)ᵀ (+ b)``  -- walks each block row (CSR);
* :func:`bsr_linear_dx`  ``dx = dy (W⊙M)``        -- walks each block column (the
  transposed metadata), so every output tile is owned by one program: no atomics;
* :func:`bsr_linear_dw`  ``dW = (dyᵀ x) ⊙ G``     -- one program per stored tile of the
  gradient pattern (sampled dense-dense, ``_bsr_sddmm_kernel``), exact zeros elsewhere.

The two products (fwd and dx) share one kernel, ``_bsr_spmm_kernel``:
``out[:, r-block] = Σ a[:, c-block] B(r, c)`` where ``B`` is a weight tile read through strides
(transposed for the forward).  Output tiles are visited in a grouped order (``GROUP_N`` row tiles
of ``a`` per weight tile) for L2 reuse, with block rows sorted by their number of blocks,
heaviest first, so the longest programs start first.  Accumulation is fp32 for every dtype;
fp32 products use ``input_precision`` (IEEE by default).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...formats import BSRMeta, CSRMeta
from . import _launch
from ._launch import Tuned, acc_dtype, cdiv, check_dtype, check_operand, dot_upcast, empty, pow2, resolve_precision

__all__ = ["bsr_linear_fwd", "bsr_linear_dx", "bsr_linear_dw", "walk_orders"]


# ------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------


@triton.jit
def _bsr_spmm_kernel(
    a_ptr,  # [N, C] dense operand, contiguous
    w_ptr,  # dense weight storage
    bias_ptr,  # [R] or dummy
    out_ptr,  # [N, R], contiguous
    ptr_ptr,  # [n_rblocks + 1] block-row pointers (CSR or CSC of the block grid)
    idx_ptr,  # [nnz_blocks] reduction-side block index of each stored block
    order_ptr,  # [n_rblocks] block rows, heaviest first
    N,
    R,
    C,
    n_rblocks,
    stride_wr,  # weight element (r, c) lives at w_ptr + r * stride_wr + c * stride_wc
    stride_wc,
    n_hint,  # N rounded up to a power of two: the tuning key, so a new batch size does not re-tune
    BR: tl.constexpr,  # block side along the output columns
    BC: tl.constexpr,  # block side along the reduction
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,  # sub-tile of BR
    BLOCK_C: tl.constexpr,  # sub-tile of BC
    GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC: tl.constexpr,  # accumulator dtype: fp32 (fp64 for fp64 operands)
):
    SPLIT_R: tl.constexpr = BR // BLOCK_R
    SPLIT_C: tl.constexpr = BC // BLOCK_C
    i_pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    n_tiles_r = n_rblocks * SPLIT_R
    # grouped order: GROUP_N consecutive row tiles of `a` sweep the same weight tiles together
    per_group = GROUP_N * n_tiles_r
    i_group = i_pid // per_group
    first_n = i_group * GROUP_N
    group_size = tl.minimum(n_tiles_n - first_n, GROUP_N)
    i_n = first_n + (i_pid % per_group) % group_size
    i_r = (i_pid % per_group) // group_size
    i_rb = tl.load(order_ptr + i_r // SPLIT_R).to(tl.int64)
    i_rs = i_r % SPLIT_R

    o_n = (i_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    o_r = i_rb * BR + i_rs * BLOCK_R + tl.arange(0, BLOCK_R)
    m_n = o_n < N
    m_r = o_r < R
    p_start = tl.load(ptr_ptr + i_rb)
    p_end = tl.load(ptr_ptr + i_rb + 1)

    # [BLOCK_N, BLOCK_R]
    b_acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=ACC)
    # one flat loop over (stored block, sub-tile along the reduction) so it software-pipelines
    for i_q in range(0, (p_end - p_start) * SPLIT_C):
        i_cb = tl.load(idx_ptr + p_start + i_q // SPLIT_C).to(tl.int64)
        o_c = i_cb * BC + (i_q % SPLIT_C) * BLOCK_C + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        # [BLOCK_N, BLOCK_C]
        b_a = tl.load(a_ptr + o_n[:, None] * C + o_c[None, :], mask=m_n[:, None] & m_c[None, :], other=0.0)
        # [BLOCK_C, BLOCK_R]
        b_w = tl.load(
            w_ptr + o_c[:, None] * stride_wc + o_r[None, :] * stride_wr, mask=m_c[:, None] & m_r[None, :], other=0.0
        )
        if UPCAST:
            b_acc += tl.dot(b_a.to(tl.float32), b_w.to(tl.float32), input_precision="ieee", out_dtype=ACC)
        else:
            b_acc += tl.dot(b_a, b_w, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        b_acc += tl.load(bias_ptr + o_r, mask=m_r, other=0.0).to(ACC)[None, :]
    # an empty block row leaves b_acc at zero: its outputs are written as zeros (or the bias)
    tl.store(
        out_ptr + o_n[:, None] * R + o_r[None, :], b_acc.to(out_ptr.dtype.element_ty), mask=m_n[:, None] & m_r[None, :]
    )


@triton.jit
def _bsr_sddmm_kernel(
    dy_ptr,  # [N, M], contiguous
    x_ptr,  # [N, K], contiguous
    out_ptr,  # [M, K], zero-initialised
    rows_ptr,  # [nnz_blocks] block row of each stored block
    cols_ptr,  # [nnz_blocks] block column of each stored block
    N,
    M,
    K,
    n_hint,
    BO: tl.constexpr,
    BK: tl.constexpr,
    BLOCK_M: tl.constexpr,  # sub-tile of BO
    BLOCK_K: tl.constexpr,  # sub-tile of BK
    BLOCK_N: tl.constexpr,  # reduction step over the batch
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC: tl.constexpr,  # accumulator dtype: fp32 (fp64 for fp64 operands)
):
    SPLIT_M: tl.constexpr = BO // BLOCK_M
    SPLIT_K: tl.constexpr = BK // BLOCK_K
    i_pid = tl.program_id(0)
    # consecutive programs are sub-tiles of one block, then blocks in CSR order (same dy columns)
    i_blk = i_pid // (SPLIT_M * SPLIT_K)
    i_sub = i_pid % (SPLIT_M * SPLIT_K)
    i_rb = tl.load(rows_ptr + i_blk).to(tl.int64)
    i_cb = tl.load(cols_ptr + i_blk).to(tl.int64)
    o_m = i_rb * BO + (i_sub // SPLIT_K) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_k = i_cb * BK + (i_sub % SPLIT_K) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_m = o_m < M
    m_k = o_k < K

    # [BLOCK_M, BLOCK_K]
    b_acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
    for i_n in range(0, tl.cdiv(N, BLOCK_N)):
        o_n = (i_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_n = o_n < N
        # [BLOCK_M, BLOCK_N]: dy transposed through its strides
        b_dy = tl.load(dy_ptr + o_n[None, :] * M + o_m[:, None], mask=m_m[:, None] & m_n[None, :], other=0.0)
        # [BLOCK_N, BLOCK_K]
        b_x = tl.load(x_ptr + o_n[:, None] * K + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0)
        if UPCAST:
            b_acc += tl.dot(b_dy.to(tl.float32), b_x.to(tl.float32), input_precision="ieee", out_dtype=ACC)
        else:
            b_acc += tl.dot(b_dy, b_x, input_precision=PRECISION, out_dtype=ACC)
    tl.store(
        out_ptr + o_m[:, None] * K + o_k[None, :], b_acc.to(out_ptr.dtype.element_ty), mask=m_m[:, None] & m_k[None, :]
    )


# ------------------------------------------------------------------------------------------
# tuning spaces
# ------------------------------------------------------------------------------------------


def _bsr_spmm_fit(meta: dict, args: dict) -> dict:
    meta = dict(meta)
    meta["BLOCK_R"] = min(meta["BLOCK_R"], args["BR"])
    meta["BLOCK_C"] = min(meta["BLOCK_C"], args["BC"])
    return meta


def _bsr_sddmm_fit(meta: dict, args: dict) -> dict:
    meta = dict(meta)
    meta["BLOCK_M"] = min(meta["BLOCK_M"], args["BO"])
    meta["BLOCK_K"] = min(meta["BLOCK_K"], args["BK"])
    return meta


def _bsr_spmm_configs():
    # (BLOCK_N, BLOCK_R, BLOCK_C, GROUP_N, warps, stages): a short list; sides are clamped to the block
    space = [
        (128, 128, 32, 8, 8, 3),
        (128, 64, 64, 8, 4, 3),
        (128, 64, 32, 8, 4, 4),
        (64, 128, 32, 8, 4, 4),
        (64, 64, 64, 8, 4, 3),
        (64, 64, 32, 8, 4, 4),
        (128, 32, 32, 8, 4, 4),
        (64, 32, 32, 8, 4, 4),
        (32, 32, 32, 8, 4, 3),
        (128, 16, 16, 8, 4, 4),
    ]
    return [
        triton.Config(dict(BLOCK_N=n, BLOCK_R=r, BLOCK_C=c, GROUP_N=g), num_warps=w, num_stages=s)
        for n, r, c, g, w, s in space
    ]


def _bsr_sddmm_configs():
    space = [
        (128, 128, 32, 8, 3),
        (64, 64, 64, 4, 3),
        (64, 64, 32, 4, 4),
        (128, 64, 64, 8, 3),
        (64, 128, 64, 8, 3),
        (32, 32, 64, 4, 4),
        (32, 32, 128, 4, 3),
        (16, 16, 128, 4, 3),
    ]
    return [triton.Config(dict(BLOCK_M=m, BLOCK_K=k, BLOCK_N=n), num_warps=w, num_stages=s) for m, k, n, w, s in space]


_bsr_spmm_tuned = Tuned(
    _bsr_spmm_kernel,
    _bsr_spmm_configs(),
    key=["n_hint", "R", "C", "BR", "BC", "PRECISION"],
    interpret_config=dict(BLOCK_N=32, BLOCK_R=32, BLOCK_C=32, GROUP_N=2),
    fit=_bsr_spmm_fit,
)
_bsr_sddmm_tuned = Tuned(
    _bsr_sddmm_kernel,
    _bsr_sddmm_configs(),
    key=["n_hint", "M", "K", "BO", "BK", "PRECISION"],
    interpret_config=dict(BLOCK_M=32, BLOCK_K=32, BLOCK_N=32),
    fit=_bsr_sddmm_fit,
)


# ------------------------------------------------------------------------------------------
# derived metadata (cached with the metadata, in the mask's MetaCache)
# ------------------------------------------------------------------------------------------


def _lengths_order(ptr: torch.Tensor) -> torch.Tensor:
    lengths = (ptr[1:] - ptr[:-1]).long()
    return torch.argsort(lengths, descending=True, stable=True).to(ptr.dtype)


def _row_ids(meta: CSRMeta) -> torch.Tensor:
    counts = (meta.crow_indices[1:] - meta.crow_indices[:-1]).long()
    rows = torch.arange(meta.shape[0], device=meta.device, dtype=meta.col_indices.dtype)
    # output_size: the count is known on the host, so CUDA needs no device-to-host sync here
    return torch.repeat_interleave(rows, counts, output_size=meta.nnz)


def walk_orders(meta: CSRMeta) -> dict[str, torch.Tensor]:
    """Heaviest-first order of rows and of columns, and the row of each stored entry.

    Built on the metadata's device (no host sync) through ``meta.derived``, so it is built once
    and rebuilt exactly when the metadata is.
    """

    def build() -> dict[str, torch.Tensor]:
        return {
            "row_order": _lengths_order(meta.crow_indices),
            "col_order": _lengths_order(meta.ccol_indices),
            "row_ids": _row_ids(meta),
        }

    return meta.derived("triton.walk_orders", build)


# ------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------


def _check_meta(meta: BSRMeta, weight_shape) -> None:
    if not isinstance(meta, BSRMeta):
        raise TypeError(f"meta: expected a BSRMeta (Pattern.bsr()), got {type(meta).__name__}")
    if tuple(meta.shape) != tuple(weight_shape):
        raise ValueError(f"meta: describes a {tuple(meta.shape)} matrix, expected {tuple(weight_shape)}")
    for side in meta.block:
        if side < 16 or side & (side - 1):
            raise ValueError(f"meta: block sides must be powers of two >= 16, got {meta.block}")


def _bsr_spmm_launch(
    a, weight, bias, out, ptr, idx, order, R, C, n_rblocks, stride_wr, stride_wc, BR, BC, precision, config
):
    N = a.shape[0]

    def grid(m):
        return (cdiv(N, m["BLOCK_N"]) * n_rblocks * (BR // m["BLOCK_R"]),)

    args = dict(
        a_ptr=a,
        w_ptr=weight,
        bias_ptr=bias if bias is not None else out,
        out_ptr=out,
        ptr_ptr=ptr,
        idx_ptr=idx,
        order_ptr=order,
        N=N,
        R=R,
        C=C,
        n_rblocks=n_rblocks,
        stride_wr=stride_wr,
        stride_wc=stride_wc,
        n_hint=pow2(N),
        BR=BR,
        BC=BC,
        HAS_BIAS=bias is not None,
        PRECISION=resolve_precision(a.dtype, precision),
        UPCAST=dot_upcast(a.dtype),
        ACC=acc_dtype(a.dtype),
    )
    _bsr_spmm_tuned(grid, args, config)
    return out


def bsr_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    meta: BSRMeta,
    *,
    precision: str | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``y = x (W⊙M)ᵀ + b`` on the stored tiles of ``meta``.

    Args:
        x: ``[N, K]`` contiguous.
        weight: ``[M, K]`` contiguous dense storage; only tiles listed in ``meta`` are read.
        bias: ``[M]`` or ``None``.
        meta: block metadata of ``M`` (``Pattern.bsr()``).
        precision: fp32 ``tl.dot`` input precision (``"ieee"``, ``"tf32"``, ``"tf32x3"``; ``None``
            follows ``torch.get_float32_matmul_precision()``).
        config: fixed meta-parameters (``BLOCK_N``, ``BLOCK_R``, ``BLOCK_C``, ``GROUP_N``, optional
            ``num_warps`` / ``num_stages``) instead of autotuning.

    Returns:
        ``[N, M]`` in ``x``'s dtype; block rows without stored tiles hold zeros (plus the bias).
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
    out = empty((x.shape[0], M), dtype=x.dtype, device=x.device)
    if x.shape[0] == 0 or M == 0:
        return out
    bo, bk = meta.block
    bl = meta.blocks
    orders = walk_orders(bl)
    return _bsr_spmm_launch(
        x, weight, bias, out, bl.crow_indices, bl.col_indices, orders["row_order"],
        M, K, bl.shape[0], weight.stride(0), weight.stride(1), bo, bk, precision, config,
    )  # fmt: skip


def bsr_linear_dx(
    dy: torch.Tensor,
    weight: torch.Tensor,
    meta: BSRMeta,
    *,
    precision: str | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``dx = dy (W⊙M)`` using the transposed block metadata (each output tile owned once).

    Args:
        dy: ``[N, M]`` contiguous; weight: ``[M, K]``; meta: block metadata of ``M``.

    Returns:
        ``[N, K]``; block columns without stored tiles hold zeros.
    """
    check_dtype(weight.dtype, "weight")
    check_operand(weight, "weight", dim=2, dtype=weight.dtype, device=weight.device)
    check_operand(dy, "dy", dim=2, dtype=weight.dtype, device=weight.device)
    _check_meta(meta, weight.shape)
    M, K = weight.shape
    if dy.shape[1] != M:
        raise ValueError(f"dy: expected shape [N, {M}], got {tuple(dy.shape)}")
    out = empty((dy.shape[0], K), dtype=dy.dtype, device=dy.device)
    if dy.shape[0] == 0 or K == 0:
        return out
    bo, bk = meta.block
    bl = meta.blocks
    orders = walk_orders(bl)
    # output columns are weight columns (block side bk), the reduction runs over weight rows (bo)
    return _bsr_spmm_launch(
        dy, weight, None, out, bl.ccol_indices, bl.row_indices, orders["col_order"],
        K, M, bl.shape[1], weight.stride(1), weight.stride(0), bk, bo, precision, config,
    )  # fmt: skip


def bsr_linear_dw(
    dy: torch.Tensor,
    x: torch.Tensor,
    meta: BSRMeta,
    *,
    precision: str | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``dW = (dyᵀ x) ⊙ G`` computed on the stored tiles of ``meta`` (the gradient pattern) only.

    Args:
        dy: ``[N, M]``; x: ``[N, K]``, both contiguous; meta: block metadata of ``G``.

    Returns:
        ``[M, K]`` dense, exactly zero outside the stored tiles.
    """
    check_dtype(x.dtype, "x")
    check_operand(x, "x", dim=2, dtype=x.dtype, device=x.device)
    check_operand(dy, "dy", dim=2, dtype=x.dtype, device=x.device)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy: expected {x.shape[0]} rows (x.shape[0]), got shape {tuple(dy.shape)}")
    M, K = dy.shape[1], x.shape[1]
    _check_meta(meta, (M, K))
    out = torch.zeros((M, K), dtype=x.dtype, device=x.device)
    bl = meta.blocks
    if bl.nnz == 0 or M == 0 or K == 0:
        return out
    bo, bk = meta.block
    orders = walk_orders(bl)
    N = x.shape[0]

    def grid(m):
        return (bl.nnz * (bo // m["BLOCK_M"]) * (bk // m["BLOCK_K"]),)

    args = dict(
        dy_ptr=dy,
        x_ptr=x,
        out_ptr=out,
        rows_ptr=orders["row_ids"],
        cols_ptr=bl.col_indices,
        N=N,
        M=M,
        K=K,
        n_hint=pow2(N),
        BO=bo,
        BK=bk,
        PRECISION=resolve_precision(x.dtype, precision),
        UPCAST=dot_upcast(x.dtype),
        ACC=acc_dtype(x.dtype),
    )
    _bsr_sddmm_tuned(grid, args, config)
    return out


def interpreted() -> bool:
    """Whether these kernels run in Triton's interpreter (``TRITON_INTERPRET`` at import)."""
    return _launch.INTERPRET
