"""Sampled dense-dense product: ``sddmm`` (the linear trio, dispatched as op ``"sddmm"``)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._backends import CallInfo, select_backend
from ..formats import Pattern
from ._common import check_mask, check_mask_guard, check_tensor, mask_guard, weight_pattern

__all__ = ["SddmmFunction", "sddmm"]


class SddmmFunction(torch.autograd.Function):
    """``C = (a @ b) ⊙ M`` expressed with the linear trio: ``C = linear_dw(aᵀ, b, M)``."""

    @staticmethod
    def forward(ctx, a, b, pattern, backend):
        ctx.save_for_backward(a, b)
        ctx.pattern, ctx.backend = pattern, backend
        ctx.guard = mask_guard(pattern)
        return backend.linear_dw(a.t().contiguous(), b, pattern)

    @staticmethod
    @once_differentiable
    def backward(ctx, dc):
        check_mask_guard(ctx.guard, "sddmm")
        a, b = ctx.saved_tensors
        dc = dc.contiguous()
        da = db = None
        if ctx.needs_input_grad[0]:  # da = (dC⊙M) bᵀ = (b (dC⊙M)ᵀ)ᵀ
            da = ctx.backend.linear_fwd(b, dc, None, ctx.pattern).t()
        if ctx.needs_input_grad[1]:  # db = aᵀ (dC⊙M)
            db = ctx.backend.linear_dx(a.t().contiguous(), dc, ctx.pattern)
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
    info = CallInfo("sddmm", a.device, a.dtype, pattern.layout, pattern.block_size, pattern.layout)
    be = select_backend(info, backend)
    return SddmmFunction.apply(a, b.contiguous(), pattern, be)
