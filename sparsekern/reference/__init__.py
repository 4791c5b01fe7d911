"""The specification: the simplest PyTorch definitions of every op, and the last-resort backend.

With weight mask ``M`` and gradient mask ``G`` (the effective ``G`` is always ``G & M``):

* ``fwd``, forward           ``y  = x (W⊙M)ᵀ + b``          (conv: ``conv2d(x, W⊙M) + b``)
* ``dx``, input gradient     ``dx = dy (W⊙M)``               (conv: transposed conv with ``W⊙M``)
* ``dw``, weight gradient    ``dW = (dyᵀ x) ⊙ G``, exactly zero outside ``G``
* bias gradient              ``db = Σ dy``

as ``linear_fwd / linear_dx / linear_dw`` and ``conv2d_fwd / conv2d_dx / conv2d_dw``.

Non-finite values: **a pruned weight does not exist.**  Every result equals the computation that
never forms a term with a pruned weight: a NaN or Inf stored at a pruned position never reaches a
result (masking uses ``masked_fill``, not a multiply), and a NaN or Inf in ``x`` (forward) or in
``dy`` (input gradient) reaches only the outputs it is connected to through ``M``: ``x = inf``
whose every connection to an output is pruned leaves that output finite, where ``x @ (W⊙M)ᵀ``
would give ``inf * 0 = NaN``.  Terms with existing weights follow IEEE arithmetic (``0 * inf`` is
NaN, ``inf - inf`` is NaN).  For conv2d, zero padding is part of the input (a zero that multiplies,
as in ``F.conv2d``: an Inf weight at a tap that reads padding gives NaN there, in ``y`` and in
``dW``), while output positions outside ``y`` do not exist (``dx`` sums over the outputs ``y``
has).  The dense PyTorch ops give exactly this when the inputs of a pass are finite; otherwise the
pass is recomputed term by term on the non-finite columns (:func:`masked_mm`, and ``unfold`` /
``fold`` for conv2d) -- slower, and a host sync per call to find them, which the finite case pays
too (one reduction over each of the pass's inputs, :func:`_all_finite`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backends import Backend, CallInfo, ConvParams

__all__ = [
    "ReferenceBackend",
    "linear_fwd",
    "linear_dx",
    "linear_dw",
    "conv2d_fwd",
    "conv2d_dx",
    "conv2d_dw",
    "masked_mm",
]


def _masked(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``W`` with exact zeros outside ``mask``: one weight-sized result and no other temporary
    (``masked_fill(~mask, 0)`` also allocates the inverted mask)."""
    return torch.where(mask, weight, 0)


def _zero_outside_(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``t`` with exact zeros written outside ``keep``, in place (a fresh product's buffer is
    reused rather than copied: the dense weight gradient is weight-sized)."""
    if t.requires_grad and torch.is_grad_enabled():  # differentiated: no out= under autograd
        return torch.where(keep, t, 0)
    return torch.where(keep, t, t.new_zeros(()), out=t)


#: elements of the ``[rows, out, inner]`` products one chunk of :func:`masked_mm` forms at most
_TERMS_PER_CHUNK = 1 << 22


def _all_finite(*ts: torch.Tensor) -> bool:
    """Whether every element of every ``t`` is finite, from one reduction per tensor: a sum with
    a NaN or an Inf among its terms is NaN or Inf, so a finite sum proves every term finite (a sum
    that overflows only sends a finite tensor down the exact, slower path).  ``isfinite(t).all()``
    costs five elementwise passes and two tensors the size of ``t`` on the CPU."""
    for t in ts:
        if t.numel() == 0:
            continue
        total = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
        if not bool(torch.isfinite(total)):
            return False
    return True


def masked_mm(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``a [N, R] @ b [R, C]`` summing only the terms ``a[n, r] * b[r, c]`` with ``keep[r, c]``.

    Equal to ``a @ b.masked_fill(~keep, 0)`` when ``a`` is finite; a non-finite ``a[n, r]`` meets
    only the ``b[r, c]`` that are kept (the columns of ``a`` holding one are summed term by term).
    """
    bk = _masked(b, keep)
    if _all_finite(a):
        return a @ bk
    bad = (~torch.isfinite(a)).any(0).nonzero().flatten()
    out = a.index_fill(1, bad, 0) @ bk.index_fill(0, bad, 0)
    a_bad, b_bad, k_bad = a.index_select(1, bad), b.index_select(0, bad), keep.index_select(0, bad)
    step = max(1, _TERMS_PER_CHUNK // max(1, b_bad.numel()))
    for i in range(0, a.shape[0], step):
        terms = a_bad[i : i + step, :, None] * b_bad[None]  # [rows, R', C]
        out[i : i + step] += terms.masked_fill(~k_bad[None], 0).sum(1)
    return out


def linear_fwd(x, weight, bias, mask):
    """``x [N, K] @ (W⊙M)ᵀ [K, M] + b`` -> ``[N, M]``."""
    if _all_finite(x):
        return F.linear(x, _masked(weight, mask), bias)
    y = masked_mm(x, weight.t(), mask.t())
    return y if bias is None else y + bias


def linear_dx(dy, weight, mask):
    """``dy [N, M] @ (W⊙M) [M, K]`` -> ``[N, K]``."""
    return masked_mm(dy, weight, mask)


def linear_dw(dy, x, grad_mask):
    """``(dyᵀ [M, N] @ x [N, K]) ⊙ G`` -> ``[M, K]``, exact zeros outside ``G``."""
    return _zero_outside_(dy.t() @ x, grad_mask)


def _unfold(x, kernel, conv: ConvParams) -> torch.Tensor:
    """The ``[N, C*kh*kw, L]`` columns of ``x`` (padding included as zeros)."""
    return F.unfold(x, tuple(kernel), conv.dilation, conv.padding, conv.stride)


def _per_group(conv: ConvParams, weight_shape, fn, dim: int = 1) -> torch.Tensor:
    """``fn(rows, cols)`` for each group's slices of the ``[out, in/groups*kh*kw]`` weight matrix
    and of the ``[N, in*kh*kw, L]`` input columns, concatenated along ``dim``."""
    o_g = weight_shape[0] // conv.groups
    k_g = weight_shape[1] * weight_shape[2] * weight_shape[3]
    return torch.cat(
        [fn(slice(g * o_g, (g + 1) * o_g), slice(g * k_g, (g + 1) * k_g)) for g in range(conv.groups)], dim=dim
    )


def _conv_fwd_terms(x, weight, mask, conv: ConvParams) -> torch.Tensor:
    """:func:`conv2d_fwd` without bias, as a :func:`masked_mm` over the input columns."""
    n = x.shape[0]
    cols = _unfold(x, weight.shape[2:], conv)
    w, m = weight.reshape(weight.shape[0], -1), mask.reshape(mask.shape[0], -1)

    def group(rows, ks):
        a = cols[:, ks].transpose(1, 2).reshape(-1, ks.stop - ks.start)  # [N*L, K_g]
        return masked_mm(a, w[rows].t(), m[rows].t()).reshape(n, -1, rows.stop - rows.start).transpose(1, 2)

    y = _per_group(conv, weight.shape, group)
    return y.reshape(n, weight.shape[0], *_out_hw(x.shape[2:], weight.shape[2:], conv))


def _out_hw(hw, kernel, conv: ConvParams) -> tuple[int, int]:
    return tuple(
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, k, p, d, st in zip(hw, kernel, conv.padding, conv.dilation, conv.stride)
    )


def conv2d_fwd(x, weight, bias, mask, conv: ConvParams):
    if weight.shape[1] == 0:  # no input channels: y is the bias (F.conv2d would drop the out channels)
        y = x.new_zeros(x.shape[0], weight.shape[0], *_out_hw(x.shape[2:], weight.shape[2:], conv))
        return y if bias is None else y + bias.reshape(1, -1, 1, 1)
    wm = _masked(weight, mask)
    if _all_finite(x, wm):
        return F.conv2d(x, wm, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    y = _conv_fwd_terms(x, weight, mask, conv)
    return y if bias is None else y + bias.reshape(1, -1, 1, 1)


def conv2d_dx(dy, weight, mask, input_shape, conv: ConvParams):
    wm = _masked(weight, mask)
    if _all_finite(dy, wm):
        return torch.nn.grad.conv2d_input(
            list(input_shape), wm, dy, conv.stride, conv.padding, conv.dilation, conv.groups
        )
    n = dy.shape[0]
    d = dy.reshape(n, dy.shape[1], -1)
    w, m = weight.reshape(weight.shape[0], -1), mask.reshape(mask.shape[0], -1)

    def group(rows, ks):
        a = d[:, rows].transpose(1, 2).reshape(-1, rows.stop - rows.start)  # [N*L, O_g]
        return masked_mm(a, w[rows], m[rows]).reshape(n, -1, ks.stop - ks.start).transpose(1, 2)

    cols = _per_group(conv, weight.shape, group)  # [N, in*kh*kw, L]
    return F.fold(cols, tuple(input_shape[2:]), tuple(weight.shape[2:]), conv.dilation, conv.padding, conv.stride)


def conv_dw_unmasked(dy, x, weight_shape, conv: ConvParams) -> torch.Tensor:
    """The conv2d weight gradient before ``G`` is applied (every position of ``W``)."""
    if _all_finite(dy, x):
        return torch.nn.grad.conv2d_weight(
            x, list(weight_shape), dy, conv.stride, conv.padding, conv.dilation, conv.groups
        )
    # padding multiplies as the zero it is (torch's own weight gradient may skip it)
    cols = _unfold(x, weight_shape[2:], conv)
    d = dy.reshape(dy.shape[0], dy.shape[1], -1)
    dw = _per_group(conv, weight_shape, lambda rows, ks: torch.einsum("nol,nkl->ok", d[:, rows], cols[:, ks]), 0)
    return dw.reshape(weight_shape)


def conv2d_dw(dy, x, grad_mask, weight_shape, conv: ConvParams):
    return _zero_outside_(conv_dw_unmasked(dy, x, weight_shape, conv), grad_mask)


class ReferenceBackend(Backend):
    """Dense masked PyTorch: runs everywhere, every dtype, every layout."""

    name = "reference"
    channels_last = True

    def supports(self, info: CallInfo) -> tuple[bool, str]:
        return True, ""

    def prepare(self, info, pattern, grad_pattern, batch=None) -> None:
        pass  # reads the masks themselves: no index metadata

    def linear_fwd(self, x, weight, bias, pattern):
        return linear_fwd(x, weight, bias, pattern.mask)

    def linear_dx(self, dy, weight, pattern):
        return linear_dx(dy, weight, pattern.mask)

    def linear_dw(self, dy, x, grad_pattern):
        return linear_dw(dy, x, grad_pattern.mask)

    def conv2d_fwd(self, x, weight, bias, pattern, conv):
        return conv2d_fwd(x, weight, bias, pattern.mask, conv)

    def conv2d_dx(self, dy, weight, pattern, input_shape, conv):
        return conv2d_dx(dy, weight, pattern.mask, input_shape, conv)

    def conv2d_dw(self, dy, x, grad_pattern, weight_shape, conv):
        return conv2d_dw(dy, x, grad_pattern.mask, weight_shape, conv)
