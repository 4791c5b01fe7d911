"""Sparse linear: ``sparse_linear`` (``LinearFunction`` runs a backend's linear trio)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import choice
from .._backends import CallInfo, is_automatic, select_backend
from ..formats import Pattern
from ._common import (
    autocast_cast,
    autocast_dtype,
    check_mask,
    check_mask_guard,
    check_tensor,
    check_weight,
    grad_pattern,
    mask_guard,
    weight_pattern,
)
from ._library import traced_linear

__all__ = ["LinearFunction", "sparse_linear"]


#: A mixed call (bf16 data, float32 master weight) reads the weight's transpose for the input
#: gradient, a column walk through the float32 weight.  Below this many weight elements a cast to
#: bf16 first measured faster (1000 x 1000 at 90 %, batch 32, AMD EPYC: cast + dx 0.35 ms against
#: 0.44 ms in place, and 0.48 against 1.66 ms inside a training step); at 4096 x 4096, batch 256,
#: reading in place wins (27.7 against 36.6 ms).
MIXED_DX_MIN = 1 << 22


class LinearFunction(torch.autograd.Function):
    """``y = x (W⊙M)ᵀ + b``; ``dW`` on the gradient pattern only.  x is 2-D and contiguous.

    ``sink``: ``None``, or a leaf of ``nnz(G)`` entries that takes the weight gradient compactly
    (``linear_dw_values``) in place of a dense ``dW`` for ``weight``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, pattern, gpattern, backend, guard, sink=None):
        ctx.save_for_backward(x, weight)
        ctx.compact = sink is not None
        ctx.pattern, ctx.gpattern, ctx.backend = pattern, gpattern, backend
        ctx.has_bias = bias is not None
        ctx.guard = guard  # mask_guard() of the call's masks
        return backend.linear_fwd(x, weight, bias, pattern)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        check_mask_guard(ctx.guard, "sparse_linear")
        x, weight = ctx.saved_tensors
        dy = dy.contiguous()
        need = ctx.needs_input_grad
        compact = ctx.compact and need[7]
        need_dw = need[7] if ctx.compact else need[1]
        if need[0] and weight.dtype != dy.dtype and weight.numel() < MIXED_DX_MIN:
            weight = weight.to(dy.dtype)  # see MIXED_DX_MIN
        dx, dw = linear_grads(dy, x, weight, ctx.pattern, ctx.gpattern, ctx.backend, need[0], need_dw, compact)
        db = dy.sum(0) if ctx.has_bias and need[2] else None
        if ctx.compact:
            return dx, None, db, None, None, None, None, dw
        return dx, dw, db, None, None, None, None, None


def linear_grads(dy, x, weight, pattern, gpattern, backend, need_dx: bool, need_dw: bool, compact: bool = False):
    """``(dx, dw)`` of a linear call on ``backend`` (``None`` where not needed); ``dy`` contiguous.
    ``compact``: ``dw`` is the ``[nnz(G)]`` values on the gradient pattern."""
    dx = backend.linear_dx(dy, weight, pattern) if need_dx else None
    if not need_dw:
        return dx, None
    return dx, backend.linear_dw_values(dy, x, gpattern) if compact else backend.linear_dw(dy, x, gpattern)


def _prepare(x, weight, bias, mask, grad_mask, layout, block_size, backend, op, master=False):
    _check(x, weight, bias, mask, grad_mask, x.dtype if master else None)
    pattern = weight_pattern(mask, layout, block_size)
    gpattern = grad_pattern(pattern, grad_mask)
    dtype = x.dtype if master else weight.dtype  # the dtype the call computes in
    info = CallInfo(op, weight.device, dtype, pattern.layout, pattern.block_size, gpattern.layout)
    return pattern, gpattern, select_backend(info, backend)


def _check(x, weight, bias, mask, grad_mask, dtype=None) -> None:
    """``dtype``: the data's dtype where it differs from the weight's (a bf16 autocast call on the
    float32 master weight)."""
    check_weight(weight)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D [out_features, in_features] tensor, got shape {tuple(weight.shape)}")
    dtype = weight.dtype if dtype is None else dtype
    check_tensor(x, "x", dtype=dtype, device=weight.device)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x: expected shape [..., {weight.shape[1]}] (in_features = weight.shape[1]), got {tuple(x.shape)}"
        )
    if bias is not None:
        check_tensor(bias, "bias", dim=1, dtype=dtype, device=weight.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_mask(mask, weight, "mask")
    if grad_mask is not None:
        check_mask(grad_mask, weight, "grad_mask")


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
    sink: torch.Tensor | None = None,
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
        sink: internal (a :class:`~sparsekern.SparseLinear` in compact-gradient mode): a leaf of
            ``nnz(G)`` entries that takes the weight gradient in place of a dense ``dW``.

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
    return linear(x, weight, bias, mask, grad_mask, backend=backend, layout=layout, block_size=block_size, sink=sink)


def linear(
    x,
    weight,
    bias,
    mask,
    grad_mask=None,
    *,
    backend=None,
    layout="unstructured",
    block_size=None,
    op="linear",
    sink=None,
):
    """:func:`sparse_linear` dispatched as ``op`` (``"linear"``, or ``"spmm"`` for :func:`~sparsekern.spmm`).

    Under ``torch.autocast`` the call follows ``nn.Linear``: x, weight and bias are cast to the
    autocast dtype and the op runs in it with autocast off.  A backend that reads a float32 weight
    with bf16 data (``mixed_bf16_weight``: cpp) gets the master weight itself, whose entries it
    rounds to bf16 as the cast would (the same result without a dense bf16 copy per call); the
    weight gradient reaches the master weight in float32 either way.
    ``sink``: see :class:`LinearFunction` (a module in compact-gradient mode passes it).
    """
    cast = autocast_dtype(weight)
    if cast is not None:
        master = cast == torch.bfloat16 and isinstance(weight, torch.Tensor) and weight.dtype == torch.float32
        if master and not torch.compiler.is_compiling():
            x, bias = autocast_cast(cast, x, bias)
        else:
            x, weight, bias = autocast_cast(cast, x, weight, bias)
            master = False
        with torch.autocast(weight.device.type, enabled=False):
            return _linear(x, weight, bias, mask, grad_mask, backend, layout, block_size, op, sink, master)
    return _linear(x, weight, bias, mask, grad_mask, backend, layout, block_size, op, sink)


def _linear(x, weight, bias, mask, grad_mask, backend, layout, block_size, op, sink=None, master=False):
    """``master``: ``weight`` is the float32 master weight of a bf16 autocast call (x and bias are
    bf16); it is cast here unless the backend that runs reads it as it is."""
    if torch.compiler.is_compiling():  # traced: one registered op, metadata built when it runs
        _check(x, weight, bias, mask, grad_mask)
        y = traced_linear(
            x.reshape(-1, x.shape[-1]).contiguous(), weight, bias, mask, grad_mask, backend, layout, block_size, op
        )
        return y.reshape(*x.shape[:-1], weight.shape[0])
    pattern, gpattern, be = _prepare(x, weight, bias, mask, grad_mask, layout, block_size, backend, op, master)
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), x.shape[-1]).contiguous()  # -1 is ambiguous when in_features = 0
    if op == "linear" and is_automatic(backend):
        be = choice.choose("linear", be, x2, weight, bias, pattern, gpattern, compact=sink is not None)
    if master and not be.mixed_bf16_weight:  # e.g. the dense fall-back: one dtype, so the cast
        weight = weight.to(x.dtype)
    guard = mask_guard(pattern, gpattern, grad_mask)
    y = LinearFunction.apply(x2, weight, bias, pattern, gpattern, be, guard, sink)
    return y.reshape(*lead, weight.shape[0])
