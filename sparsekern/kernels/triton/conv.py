"""Triton sparse conv2d as implicit GEMM: ``y = conv2d(x, W⊙M)`` and its gradients.

The weight ``[O, C, kh, kw]`` is the matrix ``[O, C·kh·kw]``; no im2col buffer is built: each
kernel computes input positions from output positions (and the reverse) on the fly, so NCHW and
channels-last tensors are read in place through their strides.  ``P`` denotes flattened output
positions ``(n, oh, ow)``; ``Q`` flattened input positions ``(n, ih, iw)``.

Block layout: a tile covers ``BO`` output channels by ``BK`` input channels and every kernel tap,
so the block metadata is a BSR over the ``[O/BO, C/BK]`` channel grid.

* :func:`bsr_conv2d_fwd`  program = (P tile, block row):      Σ stored tiles Σ taps  x_tap[P, BK] · W_tap[BK, BO]
* :func:`bsr_conv2d_dx`   program = (Q tile, block column):   Σ stored tiles Σ taps dy_tap[Q, BO] · W_tap[BO, BK]
  (the transposed metadata: each input-gradient tile is owned by one program, no atomics)
* :func:`bsr_conv2d_dw`   program = (stored G tile, tap):     Σ over P  dyᵀ[BO, P] · x_tap[P, BK]

Unstructured layout (CSR over ``[O, C·kh·kw]``): the same three with scalar weights:

* :func:`csr_conv2d_fwd`  program = (BLOCK_R output channels, P tile): Σ entries w · x_gather
* :func:`csr_conv2d_dx`   program = (BLOCK_R input channels, Q tile), walking the CSC of each tap
* :func:`csr_conv2d_dw`   program = BLOCK_Z entries of G: each a dot product over P

Accumulation is fp32 (fp64 for fp64 operands under the interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...formats import BSRMeta, CSRMeta
from ._launch import Tuned, acc_dtype, check_dtype, dot_upcast, empty, resolve_precision
from .bsr import walk_orders

__all__ = [
    "bsr_conv2d_fwd",
    "bsr_conv2d_dx",
    "bsr_conv2d_dw",
    "csr_conv2d_fwd",
    "csr_conv2d_dx",
    "csr_conv2d_dw",
]


# ------------------------------------------------------------------------------------------
# shared index arithmetic
# ------------------------------------------------------------------------------------------


@triton.jit
def _tap_source(o_p, Ho, Wo, kh, kw, SH, SW, PH, PW, DH, DW, H, W):
    """Input coordinates read by output positions ``o_p`` at tap ``(kh, kw)`` and their validity."""
    n = o_p // (Ho * Wo)
    r = o_p % (Ho * Wo)
    ih = (r // Wo) * SH - PH + kh * DH
    iw = (r % Wo) * SW - PW + kw * DW
    ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return n, ih, iw, ok


@triton.jit
def _tap_target(o_q, H, W, kh, kw, SH, SW, PH, PW, DH, DW, Ho, Wo):
    """Output coordinates that read input positions ``o_q`` at tap ``(kh, kw)`` and their validity."""
    n = o_q // (H * W)
    r = o_q % (H * W)
    th = (r // W) + PH - kh * DH
    tw = (r % W) + PW - kw * DW
    th_c = tl.where(th >= 0, th, 0)
    tw_c = tl.where(tw >= 0, tw, 0)
    oh = th_c // SH
    ow = tw_c // SW
    ok = (th >= 0) & (tw >= 0) & (th_c % SH == 0) & (tw_c % SW == 0) & (oh < Ho) & (ow < Wo)
    return n, oh, ow, ok


# ------------------------------------------------------------------------------------------
# block kernels
# ------------------------------------------------------------------------------------------


@triton.jit
def _bsr_conv2d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    crow_ptr, col_ptr,
    NP, O, C, H, W, Ho, Wo,
    sxn, sxc, sxh, sxw,
    swo, swc, swh, sww,
    syn, syc, syh, syw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr,
    BO: tl.constexpr, BK: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    i_p = tl.program_id(0)
    i_ob = tl.program_id(1).to(tl.int64)
    o_p = (i_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    m_p = o_p < NP
    o_o = i_ob * BO + tl.arange(0, BO)
    m_o = o_o < O
    o_k = tl.arange(0, BK)
    p_start = tl.load(crow_ptr + i_ob)
    p_end = tl.load(crow_ptr + i_ob + 1)
    # [BLOCK_P, BO]
    b_acc = tl.zeros((BLOCK_P, BO), dtype=ACC)
    for i_j in range(p_start, p_end):
        i_cb = tl.load(col_ptr + i_j).to(tl.int64)
        o_c = i_cb * BK + o_k
        m_c = o_c < C
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                n, ih, iw, ok = _tap_source(o_p, Ho, Wo, kh, kw, SH, SW, PH, PW, DH, DW, H, W)
                # [BLOCK_P, BK]
                b_x = tl.load(
                    x_ptr + n[:, None] * sxn + o_c[None, :] * sxc + ih[:, None] * sxh + iw[:, None] * sxw,
                    mask=(m_p & ok)[:, None] & m_c[None, :],
                    other=0.0,
                )
                # [BK, BO]
                b_w = tl.load(
                    w_ptr + o_o[None, :] * swo + o_c[:, None] * swc + kh * swh + kw * sww,
                    mask=m_c[:, None] & m_o[None, :],
                    other=0.0,
                )
                if UPCAST:
                    b_acc += tl.dot(b_x.to(tl.float32), b_w.to(tl.float32), input_precision="ieee", out_dtype=ACC)
                else:
                    b_acc += tl.dot(b_x, b_w, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        b_acc += tl.load(bias_ptr + o_o, mask=m_o, other=0.0).to(ACC)[None, :]
    n = o_p // (Ho * Wo)
    r = o_p % (Ho * Wo)
    p_y = y_ptr + n[:, None] * syn + o_o[None, :] * syc + (r // Wo)[:, None] * syh + (r % Wo)[:, None] * syw
    tl.store(p_y, b_acc.to(y_ptr.dtype.element_ty), mask=m_p[:, None] & m_o[None, :])


@triton.jit
def _bsr_conv2d_dx_kernel(
    dy_ptr, w_ptr, dx_ptr,
    ccol_ptr, row_ptr,
    NQ, O, C, H, W, Ho, Wo,
    sdn, sdc, sdh, sdw,
    swo, swc, swh, sww,
    sxn, sxc, sxh, sxw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr,
    BO: tl.constexpr, BK: tl.constexpr, BLOCK_Q: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    i_q = tl.program_id(0)
    i_cb = tl.program_id(1).to(tl.int64)
    o_q = (i_q * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
    m_q = o_q < NQ
    o_c = i_cb * BK + tl.arange(0, BK)
    m_c = o_c < C
    o_ol = tl.arange(0, BO)
    p_start = tl.load(ccol_ptr + i_cb)
    p_end = tl.load(ccol_ptr + i_cb + 1)
    # [BLOCK_Q, BK]
    b_acc = tl.zeros((BLOCK_Q, BK), dtype=ACC)
    for i_j in range(p_start, p_end):
        i_ob = tl.load(row_ptr + i_j).to(tl.int64)
        o_o = i_ob * BO + o_ol
        m_o = o_o < O
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                n, oh, ow, ok = _tap_target(o_q, H, W, kh, kw, SH, SW, PH, PW, DH, DW, Ho, Wo)
                # [BLOCK_Q, BO]
                b_dy = tl.load(
                    dy_ptr + n[:, None] * sdn + o_o[None, :] * sdc + oh[:, None] * sdh + ow[:, None] * sdw,
                    mask=(m_q & ok)[:, None] & m_o[None, :],
                    other=0.0,
                )
                # [BO, BK]
                b_w = tl.load(
                    w_ptr + o_o[:, None] * swo + o_c[None, :] * swc + kh * swh + kw * sww,
                    mask=m_o[:, None] & m_c[None, :],
                    other=0.0,
                )
                if UPCAST:
                    b_t = tl.dot(b_dy.to(tl.float32), b_w.to(tl.float32), input_precision="ieee", out_dtype=ACC)
                else:
                    b_t = tl.dot(b_dy, b_w, input_precision=PRECISION, out_dtype=ACC)
                # an output outside y does not exist: no term (an Inf weight times its 0 is NaN)
                b_acc += tl.where(ok[:, None], b_t, 0.0)
    n = o_q // (H * W)
    r = o_q % (H * W)
    p_dx = dx_ptr + n[:, None] * sxn + o_c[None, :] * sxc + (r // W)[:, None] * sxh + (r % W)[:, None] * sxw
    # a block column without stored tiles writes zeros
    tl.store(p_dx, b_acc.to(dx_ptr.dtype.element_ty), mask=m_q[:, None] & m_c[None, :])


@triton.jit
def _bsr_conv2d_dw_kernel(
    dy_ptr, x_ptr, dw_ptr,
    rows_ptr, cols_ptr,
    NP, O, C, H, W, Ho, Wo,
    sdn, sdc, sdh, sdw,
    sxn, sxc, sxh, sxw,
    swo, swc, swh, sww,
    SH, SW, PH, PW, DH, DW,
    KW: tl.constexpr,
    BO: tl.constexpr, BK: tl.constexpr, BLOCK_P: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    i_blk = tl.program_id(0)
    i_tap = tl.program_id(1)
    kh = i_tap // KW
    kw = i_tap % KW
    i_ob = tl.load(rows_ptr + i_blk).to(tl.int64)
    i_cb = tl.load(cols_ptr + i_blk).to(tl.int64)
    o_o = i_ob * BO + tl.arange(0, BO)
    o_c = i_cb * BK + tl.arange(0, BK)
    m_o = o_o < O
    m_c = o_c < C
    # [BO, BK]
    b_acc = tl.zeros((BO, BK), dtype=ACC)
    for i_p in range(0, tl.cdiv(NP, BLOCK_P)):
        o_p = (i_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
        m_p = o_p < NP
        n = o_p // (Ho * Wo)
        r = o_p % (Ho * Wo)
        # [BO, BLOCK_P]
        b_dy = tl.load(
            dy_ptr + n[None, :] * sdn + o_o[:, None] * sdc + (r // Wo)[None, :] * sdh + (r % Wo)[None, :] * sdw,
            mask=m_o[:, None] & m_p[None, :],
            other=0.0,
        )
        n, ih, iw, ok = _tap_source(o_p, Ho, Wo, kh, kw, SH, SW, PH, PW, DH, DW, H, W)
        # [BLOCK_P, BK]
        b_x = tl.load(
            x_ptr + n[:, None] * sxn + o_c[None, :] * sxc + ih[:, None] * sxh + iw[:, None] * sxw,
            mask=(m_p & ok)[:, None] & m_c[None, :],
            other=0.0,
        )
        if UPCAST:
            b_acc += tl.dot(b_dy.to(tl.float32), b_x.to(tl.float32), input_precision="ieee", out_dtype=ACC)
        else:
            b_acc += tl.dot(b_dy, b_x, input_precision=PRECISION, out_dtype=ACC)
    p_dw = dw_ptr + o_o[:, None] * swo + o_c[None, :] * swc + kh * swh + kw * sww
    tl.store(p_dw, b_acc.to(dw_ptr.dtype.element_ty), mask=m_o[:, None] & m_c[None, :])


# ------------------------------------------------------------------------------------------
# unstructured kernels
# ------------------------------------------------------------------------------------------


@triton.jit
def _csr_conv2d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    crow_ptr, col_ptr,
    NP, O, H, W, Ho, Wo,
    sxn, sxc, sxh, sxw,
    swo, swc, swh, sww,
    syn, syc, syh, syw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    i_p = tl.program_id(0)
    i_r = tl.program_id(1)
    o_o = (i_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    m_o = o_o < O
    o_p = (i_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    m_p = o_p < NP
    n = o_p // (Ho * Wo)
    r = o_p % (Ho * Wo)
    oh = r // Wo
    ow = r % Wo
    o_start = tl.load(crow_ptr + o_o, mask=m_o, other=0)
    o_len = tl.load(crow_ptr + o_o + 1, mask=m_o, other=0) - o_start
    max_len = tl.max(o_len, axis=0)
    # [BLOCK_R, BLOCK_P]
    b_acc = tl.zeros((BLOCK_R, BLOCK_P), dtype=ACC)
    for i_t in range(0, max_len):
        m_t = i_t < o_len
        o_col = tl.load(col_ptr + o_start + i_t, mask=m_t, other=0).to(tl.int64)
        c = o_col // (KH * KW)
        kh = (o_col % (KH * KW)) // KW
        kw = o_col % KW
        # [BLOCK_R]
        b_w = tl.load(w_ptr + o_o * swo + c * swc + kh * swh + kw * sww, mask=m_t, other=0.0).to(ACC)
        ih = oh[None, :] * SH - PH + (kh * DH)[:, None]
        iw = ow[None, :] * SW - PW + (kw * DW)[:, None]
        ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & m_t[:, None] & m_p[None, :]
        # [BLOCK_R, BLOCK_P]
        b_x = tl.load(x_ptr + n[None, :] * sxn + c[:, None] * sxc + ih * sxh + iw * sxw, mask=ok, other=0.0)
        b_acc += b_w[:, None] * b_x.to(ACC)
    if HAS_BIAS:
        b_acc += tl.load(bias_ptr + o_o, mask=m_o, other=0.0).to(ACC)[:, None]
    p_y = y_ptr + n[None, :] * syn + o_o[:, None] * syc + oh[None, :] * syh + ow[None, :] * syw
    tl.store(p_y, b_acc.to(y_ptr.dtype.element_ty), mask=m_o[:, None] & m_p[None, :])


@triton.jit
def _csr_conv2d_dx_kernel(
    dy_ptr, w_ptr, dx_ptr,
    ccol_ptr, row_ptr,
    NQ, C, H, W, Ho, Wo,
    sdn, sdc, sdh, sdw,
    swo, swc, swh, sww,
    sxn, sxc, sxh, sxw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    i_q = tl.program_id(0)
    i_r = tl.program_id(1)
    o_c = (i_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    m_c = o_c < C
    o_q = (i_q * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
    m_q = o_q < NQ
    # [BLOCK_R, BLOCK_Q]
    b_acc = tl.zeros((BLOCK_R, BLOCK_Q), dtype=ACC)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            n, oh, ow, ok = _tap_target(o_q, H, W, kh, kw, SH, SW, PH, PW, DH, DW, Ho, Wo)
            # the matrix column of (channel c, tap) is c * KH * KW + tap: walk its CSC entries
            o_colm = o_c * (KH * KW) + kh * KW + kw
            o_start = tl.load(ccol_ptr + o_colm, mask=m_c, other=0)
            o_len = tl.load(ccol_ptr + o_colm + 1, mask=m_c, other=0) - o_start
            max_len = tl.max(o_len, axis=0)
            for i_t in range(0, max_len):
                m_t = i_t < o_len
                o_o = tl.load(row_ptr + o_start + i_t, mask=m_t, other=0).to(tl.int64)
                # [BLOCK_R]
                b_w = tl.load(w_ptr + o_o * swo + o_c * swc + kh * swh + kw * sww, mask=m_t, other=0.0).to(ACC)
                # [BLOCK_R, BLOCK_Q]
                b_dy = tl.load(
                    dy_ptr + n[None, :] * sdn + o_o[:, None] * sdc + oh[None, :] * sdh + ow[None, :] * sdw,
                    mask=m_t[:, None] & (m_q & ok)[None, :],
                    other=0.0,
                )
                # an output outside y does not exist: no term (an Inf weight times its 0 is NaN)
                b_acc += tl.where(ok[None, :], b_w[:, None] * b_dy.to(ACC), 0.0)
    n = o_q // (H * W)
    r = o_q % (H * W)
    p_dx = dx_ptr + n[None, :] * sxn + o_c[:, None] * sxc + (r // W)[None, :] * sxh + (r % W)[None, :] * sxw
    tl.store(p_dx, b_acc.to(dx_ptr.dtype.element_ty), mask=m_c[:, None] & m_q[None, :])


@triton.jit
def _csr_conv2d_dw_kernel(
    dy_ptr, x_ptr, dw_ptr,
    rows_ptr, cols_ptr,
    nnz, NP, H, W, Ho, Wo,
    sdn, sdc, sdh, sdw,
    sxn, sxc, sxh, sxw,
    swo, swc, swh, sww,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_Z: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    i_z = tl.program_id(0)
    o_z = (i_z * BLOCK_Z + tl.arange(0, BLOCK_Z)).to(tl.int64)
    m_z = o_z < nnz
    o_o = tl.load(rows_ptr + o_z, mask=m_z, other=0).to(tl.int64)
    o_col = tl.load(cols_ptr + o_z, mask=m_z, other=0).to(tl.int64)
    c = o_col // (KH * KW)
    kh = (o_col % (KH * KW)) // KW
    kw = o_col % KW
    # [BLOCK_Z, BLOCK_P]
    b_acc = tl.zeros((BLOCK_Z, BLOCK_P), dtype=ACC)
    for i_p in range(0, tl.cdiv(NP, BLOCK_P)):
        o_p = (i_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
        m_p = o_p < NP
        n = o_p // (Ho * Wo)
        r = o_p % (Ho * Wo)
        oh = r // Wo
        ow = r % Wo
        m = m_z[:, None] & m_p[None, :]
        b_dy = tl.load(
            dy_ptr + n[None, :] * sdn + o_o[:, None] * sdc + oh[None, :] * sdh + ow[None, :] * sdw, mask=m, other=0.0
        )
        ih = oh[None, :] * SH - PH + (kh * DH)[:, None]
        iw = ow[None, :] * SW - PW + (kw * DW)[:, None]
        ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & m
        b_x = tl.load(x_ptr + n[None, :] * sxn + c[:, None] * sxc + ih * sxh + iw * sxw, mask=ok, other=0.0)
        b_acc += b_dy.to(ACC) * b_x.to(ACC)
    # [BLOCK_Z]
    b_res = tl.sum(b_acc, axis=1)
    tl.store(dw_ptr + o_o * swo + c * swc + kh * swh + kw * sww, b_res.to(dw_ptr.dtype.element_ty), mask=m_z)


# ------------------------------------------------------------------------------------------
# tuning spaces (GPU); fixed configurations under the interpreter
# ------------------------------------------------------------------------------------------


def _cfgs(name, space):
    return [triton.Config({name: v}, num_warps=w, num_stages=s) for v, w, s in space]


_bsr_conv2d_fwd_tuned = Tuned(
    _bsr_conv2d_fwd_kernel,
    _cfgs("BLOCK_P", [(32, 4, 3), (64, 4, 3), (128, 8, 3), (64, 8, 4)]),
    key=["NP", "O", "C", "BO", "BK"],
    interpret_config=dict(BLOCK_P=64),
)
_bsr_conv2d_dx_tuned = Tuned(
    _bsr_conv2d_dx_kernel,
    _cfgs("BLOCK_Q", [(32, 4, 3), (64, 4, 3), (128, 8, 3), (64, 8, 4)]),
    key=["NQ", "O", "C", "BO", "BK"],
    interpret_config=dict(BLOCK_Q=64),
)
_bsr_conv2d_dw_tuned = Tuned(
    _bsr_conv2d_dw_kernel,
    _cfgs("BLOCK_P", [(32, 4, 3), (64, 4, 3), (128, 8, 3)]),
    key=["NP", "O", "C", "BO", "BK"],
    interpret_config=dict(BLOCK_P=64),
)
_csr_conv2d_fwd_tuned = Tuned(
    _csr_conv2d_fwd_kernel,
    [
        triton.Config(dict(BLOCK_R=r, BLOCK_P=p), num_warps=w)
        for r, p, w in [(8, 128, 4), (16, 64, 4), (4, 256, 4), (16, 128, 8)]
    ],
    key=["NP", "O"],
    interpret_config=dict(BLOCK_R=16, BLOCK_P=128),
)
_csr_conv2d_dx_tuned = Tuned(
    _csr_conv2d_dx_kernel,
    [triton.Config(dict(BLOCK_R=r, BLOCK_Q=q), num_warps=w) for r, q, w in [(8, 128, 4), (16, 64, 4), (4, 256, 4)]],
    key=["NQ", "C"],
    interpret_config=dict(BLOCK_R=16, BLOCK_Q=128),
)
_csr_conv2d_dw_tuned = Tuned(
    _csr_conv2d_dw_kernel,
    [triton.Config(dict(BLOCK_Z=z, BLOCK_P=p), num_warps=w) for z, p, w in [(32, 128, 4), (64, 64, 4), (16, 256, 4)]],
    key=["nnz", "NP"],
    interpret_config=dict(BLOCK_Z=64, BLOCK_P=128),
)


# ------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _like(t: torch.Tensor, shape) -> torch.Tensor:
    """Output buffer in ``t``'s memory format (channels-last stays channels-last)."""
    cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    out = empty(shape, dtype=t.dtype, device=t.device)
    return out.contiguous(memory_format=torch.channels_last) if cl else out


def _check(x, weight, conv, what):
    check_dtype(weight.dtype, "weight")
    if x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(f"{what}: expected a {weight.dtype} tensor on {weight.device}, got {x.dtype} on {x.device}")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"{what}: expected 4-D tensors, got {tuple(x.shape)} and weight {tuple(weight.shape)}")
    if conv.groups != 1:
        raise ValueError(f"groups: the Triton conv kernels support groups=1, got {conv.groups}")


def _check_grad_args(dy, x, conv):
    check_dtype(x.dtype, "x")
    if dy.dtype != x.dtype or dy.device != x.device:
        raise ValueError(f"dy: expected a {x.dtype} tensor on {x.device}, got {dy.dtype} on {dy.device}")
    if x.dim() != 4 or dy.dim() != 4:
        raise ValueError(f"x, dy: expected 4-D tensors, got {tuple(x.shape)} and {tuple(dy.shape)}")
    if conv.groups != 1:
        raise ValueError(f"groups: the Triton conv kernels support groups=1, got {conv.groups}")


def _conv_scalars(conv):
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    return dict(SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw)


def _precision_args(dtype, precision):
    return dict(PRECISION=resolve_precision(dtype, precision), UPCAST=dot_upcast(dtype), ACC=acc_dtype(dtype))


def _block_channels(meta: BSRMeta, weight_shape) -> tuple[int, int]:
    """Channel tile ``(BO, BK)`` of a conv block pattern (its matrix tile is ``(BO, BK·kh·kw)``)."""
    return meta.block.channels(weight_shape, name="meta")


def bsr_conv2d_fwd(x, weight, bias, meta: BSRMeta, conv, *, precision=None, config=None):
    """``conv2d(x, W⊙M) + b`` on the stored channel tiles of ``meta`` (``Pattern.bsr()`` of a conv mask)."""
    _check(x, weight, conv, "x")
    O, C, KH, KW = weight.shape
    N, _, H, W = x.shape
    Ho = _out_size(H, KH, conv.stride[0], conv.padding[0], conv.dilation[0])
    Wo = _out_size(W, KW, conv.stride[1], conv.padding[1], conv.dilation[1])
    y = _like(x, (N, O, Ho, Wo))
    NP = N * Ho * Wo
    if NP == 0 or O == 0:
        return y
    bo, bk = _block_channels(meta, weight.shape)
    bl = meta.blocks
    args = dict(
        x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else y, y_ptr=y,
        crow_ptr=bl.crow_indices, col_ptr=bl.col_indices,
        NP=NP, O=O, C=C, H=H, W=W, Ho=Ho, Wo=Wo,
        sxn=x.stride(0), sxc=x.stride(1), sxh=x.stride(2), sxw=x.stride(3),
        swo=weight.stride(0), swc=weight.stride(1), swh=weight.stride(2), sww=weight.stride(3),
        syn=y.stride(0), syc=y.stride(1), syh=y.stride(2), syw=y.stride(3),
        KH=KH, KW=KW, BO=bo, BK=bk, HAS_BIAS=bias is not None,
        **_conv_scalars(conv), **_precision_args(x.dtype, precision),
    )  # fmt: skip
    _bsr_conv2d_fwd_tuned(lambda m: (triton.cdiv(NP, m["BLOCK_P"]), bl.shape[0]), args, config)
    return y


def bsr_conv2d_dx(dy, weight, meta: BSRMeta, input_shape, conv, *, precision=None, config=None):
    """``dx`` of :func:`bsr_conv2d_fwd`, walking the transposed block metadata."""
    _check(dy, weight, conv, "dy")
    O, C, KH, KW = weight.shape
    N, _, H, W = input_shape
    Ho, Wo = dy.shape[2], dy.shape[3]
    dx = _like(dy, (N, C, H, W))
    NQ = N * H * W
    if NQ == 0 or C == 0:
        return dx
    bo, bk = _block_channels(meta, weight.shape)
    bl = meta.blocks
    args = dict(
        dy_ptr=dy, w_ptr=weight, dx_ptr=dx, ccol_ptr=bl.ccol_indices, row_ptr=bl.row_indices,
        NQ=NQ, O=O, C=C, H=H, W=W, Ho=Ho, Wo=Wo,
        sdn=dy.stride(0), sdc=dy.stride(1), sdh=dy.stride(2), sdw=dy.stride(3),
        swo=weight.stride(0), swc=weight.stride(1), swh=weight.stride(2), sww=weight.stride(3),
        sxn=dx.stride(0), sxc=dx.stride(1), sxh=dx.stride(2), sxw=dx.stride(3),
        KH=KH, KW=KW, BO=bo, BK=bk,
        **_conv_scalars(conv), **_precision_args(dy.dtype, precision),
    )  # fmt: skip
    _bsr_conv2d_dx_tuned(lambda m: (triton.cdiv(NQ, m["BLOCK_Q"]), bl.shape[1]), args, config)
    return dx


def bsr_conv2d_dw(dy, x, meta: BSRMeta, weight_shape, conv, *, precision=None, config=None):
    """``dW`` on the stored tiles of the gradient pattern ``meta``; exact zeros elsewhere."""
    _check_grad_args(dy, x, conv)
    O, C, KH, KW = weight_shape
    N, _, H, W = x.shape
    Ho, Wo = dy.shape[2], dy.shape[3]
    dw = torch.zeros(weight_shape, dtype=x.dtype, device=x.device)
    bo, bk = _block_channels(meta, weight_shape)
    bl = meta.blocks
    NP = N * Ho * Wo
    if bl.nnz == 0 or NP == 0:
        return dw
    args = dict(
        dy_ptr=dy, x_ptr=x, dw_ptr=dw, rows_ptr=walk_orders(bl)["row_ids"], cols_ptr=bl.col_indices,
        NP=NP, O=O, C=C, H=H, W=W, Ho=Ho, Wo=Wo,
        sdn=dy.stride(0), sdc=dy.stride(1), sdh=dy.stride(2), sdw=dy.stride(3),
        sxn=x.stride(0), sxc=x.stride(1), sxh=x.stride(2), sxw=x.stride(3),
        swo=dw.stride(0), swc=dw.stride(1), swh=dw.stride(2), sww=dw.stride(3),
        KW=KW, BO=bo, BK=bk,
        **_conv_scalars(conv), **_precision_args(x.dtype, precision),
    )  # fmt: skip
    _bsr_conv2d_dw_tuned(lambda m: (bl.nnz, KH * KW), args, config)
    return dw


def csr_conv2d_fwd(x, weight, bias, meta: CSRMeta, conv, *, config=None):
    """``conv2d(x, W⊙M) + b`` for an unstructured mask (``Pattern.csr()`` of the conv mask)."""
    _check(x, weight, conv, "x")
    O, C, KH, KW = weight.shape
    N, _, H, W = x.shape
    Ho = _out_size(H, KH, conv.stride[0], conv.padding[0], conv.dilation[0])
    Wo = _out_size(W, KW, conv.stride[1], conv.padding[1], conv.dilation[1])
    y = _like(x, (N, O, Ho, Wo))
    NP = N * Ho * Wo
    if NP == 0 or O == 0:
        return y
    args = dict(
        x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else y, y_ptr=y,
        crow_ptr=meta.crow_indices, col_ptr=meta.col_indices,
        NP=NP, O=O, H=H, W=W, Ho=Ho, Wo=Wo,
        sxn=x.stride(0), sxc=x.stride(1), sxh=x.stride(2), sxw=x.stride(3),
        swo=weight.stride(0), swc=weight.stride(1), swh=weight.stride(2), sww=weight.stride(3),
        syn=y.stride(0), syc=y.stride(1), syh=y.stride(2), syw=y.stride(3),
        KH=KH, KW=KW, HAS_BIAS=bias is not None, ACC=acc_dtype(x.dtype), **_conv_scalars(conv),
    )  # fmt: skip
    _csr_conv2d_fwd_tuned(lambda m: (triton.cdiv(NP, m["BLOCK_P"]), triton.cdiv(O, m["BLOCK_R"])), args, config)
    return y


def csr_conv2d_dx(dy, weight, meta: CSRMeta, input_shape, conv, *, config=None):
    """``dx`` of :func:`csr_conv2d_fwd`, walking the CSC of each (input channel, tap) column."""
    _check(dy, weight, conv, "dy")
    O, C, KH, KW = weight.shape
    N, _, H, W = input_shape
    Ho, Wo = dy.shape[2], dy.shape[3]
    dx = _like(dy, (N, C, H, W))
    NQ = N * H * W
    if NQ == 0 or C == 0:
        return dx
    args = dict(
        dy_ptr=dy, w_ptr=weight, dx_ptr=dx, ccol_ptr=meta.ccol_indices, row_ptr=meta.row_indices,
        NQ=NQ, C=C, H=H, W=W, Ho=Ho, Wo=Wo,
        sdn=dy.stride(0), sdc=dy.stride(1), sdh=dy.stride(2), sdw=dy.stride(3),
        swo=weight.stride(0), swc=weight.stride(1), swh=weight.stride(2), sww=weight.stride(3),
        sxn=dx.stride(0), sxc=dx.stride(1), sxh=dx.stride(2), sxw=dx.stride(3),
        KH=KH, KW=KW, ACC=acc_dtype(dy.dtype), **_conv_scalars(conv),
    )  # fmt: skip
    _csr_conv2d_dx_tuned(lambda m: (triton.cdiv(NQ, m["BLOCK_Q"]), triton.cdiv(C, m["BLOCK_R"])), args, config)
    return dx


def csr_conv2d_dw(dy, x, meta: CSRMeta, weight_shape, conv, *, config=None):
    """``dW`` on the entries of the gradient pattern ``meta``; exact zeros elsewhere."""
    _check_grad_args(dy, x, conv)
    O, C, KH, KW = weight_shape
    N, _, H, W = x.shape
    Ho, Wo = dy.shape[2], dy.shape[3]
    dw = torch.zeros(weight_shape, dtype=x.dtype, device=x.device)
    NP = N * Ho * Wo
    if meta.nnz == 0 or NP == 0:
        return dw
    args = dict(
        dy_ptr=dy, x_ptr=x, dw_ptr=dw, rows_ptr=walk_orders(meta)["row_ids"], cols_ptr=meta.col_indices,
        nnz=meta.nnz, NP=NP, H=H, W=W, Ho=Ho, Wo=Wo,
        sdn=dy.stride(0), sdc=dy.stride(1), sdh=dy.stride(2), sdw=dy.stride(3),
        sxn=x.stride(0), sxc=x.stride(1), sxh=x.stride(2), sxw=x.stride(3),
        swo=dw.stride(0), swc=dw.stride(1), swh=dw.stride(2), sww=dw.stride(3),
        KH=KH, KW=KW, ACC=acc_dtype(x.dtype), **_conv_scalars(conv),
    )  # fmt: skip
    _csr_conv2d_dw_tuned(lambda m: (triton.cdiv(meta.nnz, m["BLOCK_Z"]),), args, config)
    return dw
