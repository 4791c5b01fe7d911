"""Sparse linear: ``sparse_linear`` and the lower-level ``spmm`` / ``sddmm``."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._backends import CallInfo, select_backend
from ..formats import Pattern
from ._common import check_mask, check_tensor, check_weight, grad_pattern, weight_pattern

__all__ = ["sparse_linear", "spmm", "sddmm"]


class SparseLinearFunction(torch.autograd.Function):
    """``y = x (W⊙M)ᵀ + b``; ``dW`` on the gradient pattern only.  x is 2-D and contiguous."""

    @staticmethod
    def forward(ctx, x, weight, bias, pattern, gpattern, backend):
        ctx.save_for_backward(x, weight)
        ctx.pattern, ctx.gpattern, ctx.backend = pattern, gpattern, backend
        ctx.has_bias = bias is not None
        return backend.linear_forward(x, weight, bias, pattern)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = ctx.backend.linear_input_grad(dy, weight, ctx.pattern)
        if ctx.needs_input_grad[1]:
            dw = ctx.backend.linear_weight_grad(dy, x, ctx.gpattern)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0)
        return dx, dw, db, None, None, None


def _prepare(x, weight, bias, mask, grad_mask, layout, block_size, backend):
    check_weight(weight)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D [out_features, in_features] tensor, got shape {tuple(weight.shape)}")
    check_tensor(x, "x", dtype=weight.dtype, device=weight.device)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x: expected shape [..., {weight.shape[1]}] (in_features = weight.shape[1]), got {tuple(x.shape)}"
        )
    if bias is not None:
        check_tensor(bias, "bias", dim=1, dtype=weight.dtype, device=weight.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_mask(mask, weight, "mask")
    if grad_mask is not None:
        check_mask(grad_mask, weight, "grad_mask")
    pattern = weight_pattern(mask, layout, block_size)
    gpattern = grad_pattern(pattern, grad_mask)
    info = CallInfo("linear", weight.device, weight.dtype, pattern.layout, pattern.block_size, gpattern.layout)
    return pattern, gpattern, select_backend(info, backend)


def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | Pattern,
    grad_mask: torch.Tensor | Pattern | None = None,
    *,
    backend: str | None = None,
    layout: str = "unstructured",
    block_size: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """Masked linear layer: ``y = x (W⊙M)ᵀ + b`` with a gradient-masked backward.

    Args:
        x: ``[..., in_features]``.
        weight: ``[out_features, in_features]``, dense storage; only entries in ``mask`` are read.
        bias: ``[out_features]`` or ``None``.
        mask: boolean ``[out_features, in_features]``: the connections that exist (``M``).
        grad_mask: boolean, same shape: the connections whose gradient is computed (``G``);
            ``None`` means ``G = M``.  Only ``G & M`` is used; ``dW`` is exactly zero elsewhere.
        backend: ``"triton"``, ``"cuda"``, ``"cpp"``, ``"reference"`` or ``None`` (automatic).
        layout: ``"unstructured"`` or ``"block"``.
        block_size: for ``"block"``: ``b`` or ``(bo, bk)`` with sides in (16, 32, 64, 128).

    Returns:
        ``[..., out_features]``.

    Raises:
        TypeError / ValueError naming the offending argument; ``BackendError`` when an explicit
        backend cannot run the call.

    Example:
        >>> w = torch.randn(8, 4); m = torch.rand(8, 4) > 0.5
        >>> sparse_linear(torch.randn(3, 4), w, None, m).shape
        torch.Size([3, 8])
    """
    pattern, gpattern, be = _prepare(x, weight, bias, mask, grad_mask, layout, block_size, backend)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = SparseLinearFunction.apply(x2, weight, bias, pattern, gpattern, be)
    return y.reshape(*lead, weight.shape[0])


def spmm(
    a: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor | Pattern,
    *,
    transpose: bool = True,
    backend: str | None = None,
    layout: str = "unstructured",
    block_size=None,
) -> torch.Tensor:
    """Dense times masked-sparse: ``a @ (W⊙M)ᵀ`` (``transpose=True``) or ``a @ (W⊙M)``.

    Args:
        a: ``[N, K]`` for ``transpose=True`` (``K = weight.shape[1]``), else ``[N, weight.shape[0]]``.
        weight, mask: ``[M, K]``; see :func:`sparse_linear`.

    Differentiable in ``a`` and ``weight`` (the weight gradient on ``mask`` only).
    """
    if transpose:
        return sparse_linear(a, weight, None, mask, None, backend=backend, layout=layout, block_size=block_size)
    if isinstance(mask, Pattern):
        raise TypeError("mask: spmm(transpose=False) takes a boolean tensor, not a Pattern")
    check_weight(weight)
    check_mask(mask, weight, "mask")
    if isinstance(block_size, (tuple, list)) and len(block_size) == 2:
        block_size = (block_size[1], block_size[0])
    wt, mt = weight.t().contiguous(), mask.t().contiguous()
    return sparse_linear(a, wt, None, mt, None, backend=backend, layout=layout, block_size=block_size)


class SDDMMFunction(torch.autograd.Function):
    """``C = (a @ b) ⊙ M`` expressed with the linear trio: ``C = linear_weight_grad(aᵀ, b, M)``."""

    @staticmethod
    def forward(ctx, a, b, pattern, backend):
        ctx.save_for_backward(a, b)
        ctx.pattern, ctx.backend = pattern, backend
        return backend.linear_weight_grad(a.t().contiguous(), b, pattern)

    @staticmethod
    @once_differentiable
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        dc = dc.contiguous()
        da = db = None
        if ctx.needs_input_grad[0]:  # da = (dC⊙M) bᵀ = (b (dC⊙M)ᵀ)ᵀ
            da = ctx.backend.linear_forward(b, dc, None, ctx.pattern).t()
        if ctx.needs_input_grad[1]:  # db = aᵀ (dC⊙M)
            db = ctx.backend.linear_input_grad(a.t().contiguous(), dc, ctx.pattern)
        return da, db, None, None


def sddmm(
    a: torch.Tensor,
    b: torch.Tensor,
    mask: torch.Tensor | Pattern,
    *,
    backend: str | None = None,
    layout: str = "unstructured",
    block_size=None,
) -> torch.Tensor:
    """Sampled dense-dense product ``(a @ b) ⊙ mask`` as a dense tensor with exact zeros off the mask.

    Args:
        a: ``[M, N]``; b: ``[N, K]``; mask: boolean ``[M, K]``.
    """
    check_tensor(a, "a", dim=2)
    if a.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"a: expected a floating dtype, got {a.dtype}")
    check_tensor(b, "b", dim=2, dtype=a.dtype, device=a.device)
    if b.shape[0] != a.shape[1]:
        raise ValueError(f"b: expected {a.shape[1]} rows (a.shape[1]), got shape {tuple(b.shape)}")
    ref = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    check_mask(mask, ref, "mask")
    pattern = weight_pattern(mask, layout, block_size)
    info = CallInfo("linear", a.device, a.dtype, pattern.layout, pattern.block_size, pattern.layout)
    be = select_backend(info, backend)
    return SDDMMFunction.apply(a, b.contiguous(), pattern, be)
