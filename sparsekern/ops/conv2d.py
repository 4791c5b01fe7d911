"""Sparse conv2d: ``sparse_conv2d``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import choice
from .._backends import CallInfo, ConvParams, is_automatic, select_backend
from ..formats import Pattern, flat_index
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
from ._library import traced_conv2d

__all__ = ["sparse_conv2d", "normalize_conv_args"]


class Conv2dFunction(torch.autograd.Function):
    """``y = conv2d(x, W⊙M) + b``; ``dW`` on the gradient pattern only.

    ``x`` is 4-D and contiguous: NCHW, or channels-last for backends that declare
    ``channels_last`` (their kernels read strides).  ``sink``: as for
    :class:`~sparsekern.ops.linear.LinearFunction` (the compact weight gradient).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, pattern, gpattern, conv, backend, guard, sink=None):
        ctx.save_for_backward(x, weight)
        ctx.compact = sink is not None
        ctx.pattern, ctx.gpattern, ctx.conv, ctx.backend = pattern, gpattern, conv, backend
        ctx.has_bias = bias is not None
        ctx.guard = guard  # mask_guard() of the call's masks
        return backend.conv2d_fwd(x, weight, bias, pattern, conv)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        check_mask_guard(ctx.guard, "sparse_conv2d")
        x, weight = ctx.saved_tensors
        dy = _dense_layout(dy, ctx.backend)
        need = ctx.needs_input_grad
        need_dw = need[8] if ctx.compact else need[1]
        args = (dy, x, weight, ctx.pattern, ctx.gpattern, ctx.conv, ctx.backend, need[0], need_dw, ctx.compact)
        dx, dw = conv2d_grads(*args)
        db = dy.sum((0, 2, 3)) if ctx.has_bias and need[2] else None
        if ctx.compact:
            return dx, None, db, None, None, None, None, None, dw
        return dx, dw, db, None, None, None, None, None, None


def conv2d_grads(dy, x, weight, pattern, gpattern, conv, backend, need_dx: bool, need_dw: bool, compact=False):
    """``(dx, dw)`` of a conv2d call on ``backend`` (``None`` where not needed); ``dy`` in the
    backend's layout (:func:`_dense_layout`).  ``compact``: ``dw`` is the ``[nnz(G)]`` values on
    the gradient pattern."""
    fused = getattr(backend, "conv2d_dx_dw", None)
    if fused is not None and need_dx and need_dw:
        dx, dw = fused(dy, x, weight, pattern, gpattern, conv)
        return dx, dw.reshape(-1).index_select(0, flat_index(gpattern)) if compact else dw
    dx = backend.conv2d_dx(dy, weight, pattern, tuple(x.shape), conv) if need_dx else None
    if not need_dw:
        return dx, None
    dw_of = backend.conv2d_dw_values if compact else backend.conv2d_dw
    return dx, dw_of(dy, x, gpattern, tuple(weight.shape), conv)


def _dense_layout(t: torch.Tensor, backend) -> torch.Tensor:
    """``t`` as is if it is dense channels-last and the backend reads that, else NCHW-contiguous."""
    if backend.channels_last and t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _pair(v, name: str, *, minimum: int) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if not (
        isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
    ):
        raise ValueError(f"{name}: expected an int or a pair of ints, got {v!r}")
    if min(v) < minimum:
        raise ValueError(f"{name}: expected values >= {minimum}, got {tuple(v)}")
    return (int(v[0]), int(v[1]))


def normalize_conv_args(weight_shape, stride, padding, dilation, groups):
    """``(ConvParams, extra_pad)``: ``extra_pad`` is an ``F.pad`` tuple for asymmetric 'same' padding."""
    stride = _pair(stride, "stride", minimum=1)
    dilation = _pair(dilation, "dilation", minimum=1)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    extra = None
    if isinstance(padding, str):
        if padding == "valid":
            pad = (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError("padding: 'same' is only supported with stride 1")
            pad_l, pad_r = [], []
            for d, k in zip(dilation, weight_shape[2:]):
                total = d * (k - 1)
                pad_l.append(total // 2)
                pad_r.append(total - total // 2)
            if pad_l == pad_r:
                pad = (pad_l[0], pad_l[1])
            else:  # asymmetric: pad the input by the difference first
                pad = (pad_l[0], pad_l[1])
                extra = (0, pad_r[1] - pad_l[1], 0, pad_r[0] - pad_l[0])
        else:
            raise ValueError(f"padding: expected an int, a pair, 'same' or 'valid', got {padding!r}")
    else:
        pad = _pair(padding, "padding", minimum=0)
    return ConvParams(stride, pad, dilation, groups), extra


def sparse_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | Pattern,
    grad_mask: torch.Tensor | Pattern | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    backend: str | None = None,
    layout: str = "unstructured",
    block_size: int | tuple[int, int] | None = None,
    sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked 2-D convolution with a gradient-masked backward (same arguments as ``F.conv2d``).

    Args:
        x: ``[N, C_in, H, W]`` (or unbatched ``[C_in, H, W]``).
        weight: ``[C_out, C_in/groups, kh, kw]``; only entries in ``mask`` are read.
        bias: ``[C_out]`` or ``None``.
        mask, grad_mask: boolean, the weight's shape (see :func:`sparsekern.sparse_linear`).
        stride, padding, dilation, groups: as in ``torch.nn.functional.conv2d``
            (``padding`` may be ``'same'`` or ``'valid'``).
        layout, block_size: ``"block"`` tiles cover ``bo`` output channels by ``bk`` input
            channels and every kernel tap.
        sink: internal (a :class:`~sparsekern.SparseConv2d` in compact-gradient mode): a leaf of
            ``nnz(G)`` entries that takes the weight gradient in place of a dense ``dW``.

    Returns:
        ``[N, C_out, H_out, W_out]`` (in the autocast dtype under ``torch.autocast``, which casts
        x, weight and bias as it does for ``nn.Conv2d``).
    """
    check_weight(weight)
    cast = autocast_dtype(weight)
    args = (stride, padding, dilation, groups, backend, layout, block_size, sink)
    if cast is None:
        return _conv2d(x, weight, bias, mask, grad_mask, *args)
    x, weight, bias = autocast_cast(cast, x, weight, bias)
    with torch.autocast(weight.device.type, enabled=False):
        return _conv2d(x, weight, bias, mask, grad_mask, *args)


def _conv2d(x, weight, bias, mask, grad_mask, stride, padding, dilation, groups, backend, layout, block_size, sink):
    if weight.dim() != 4:
        raise ValueError(f"weight: expected a 4-D [out, in/groups, kh, kw] tensor, got shape {tuple(weight.shape)}")
    check_tensor(x, "x", dim=(3, 4), dtype=weight.dtype, device=weight.device)
    conv, extra = normalize_conv_args(tuple(weight.shape), stride, padding, dilation, groups)
    if weight.shape[0] % conv.groups:
        raise ValueError(f"groups: out_channels={weight.shape[0]} is not divisible by groups={conv.groups}")
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if x.shape[1] != weight.shape[1] * conv.groups:
        raise ValueError(
            f"x: expected {weight.shape[1] * conv.groups} input channels (weight.shape[1] * groups), "
            f"got shape {tuple(x.shape)}"
        )
    if bias is not None:
        check_tensor(bias, "bias", dim=1, dtype=weight.dtype, device=weight.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_mask(mask, weight, "mask")
    if grad_mask is not None:
        check_mask(grad_mask, weight, "grad_mask")
    if extra is not None:
        x = F.pad(x, extra)
    for size, p, d, k in zip(x.shape[2:], conv.padding, conv.dilation, weight.shape[2:]):
        if size + 2 * p < d * (k - 1) + 1:
            raise ValueError(
                f"x: spatial size {tuple(x.shape[2:])} with padding {conv.padding} is smaller than the "
                f"dilated kernel {tuple(weight.shape[2:])}"
            )
    if torch.compiler.is_compiling():  # traced: one registered op, metadata built when it runs
        y = traced_conv2d(x, weight, bias, mask, grad_mask, conv, backend, layout, block_size)
        return y.squeeze(0) if unbatched else y
    pattern = weight_pattern(mask, layout, block_size)
    gpattern = grad_pattern(pattern, grad_mask)
    info = CallInfo(
        "conv2d",
        weight.device,
        weight.dtype,
        pattern.layout,
        pattern.block_size,
        gpattern.layout,
        conv,
        tuple(weight.shape),
    )
    be = select_backend(info, backend)
    if is_automatic(backend):
        be = choice.choose("conv2d", be, x, weight, bias, pattern, gpattern, conv, compact=sink is not None)
    guard = mask_guard(pattern, gpattern, grad_mask)
    y = Conv2dFunction.apply(_dense_layout(x, be), weight, bias, pattern, gpattern, conv, be, guard, sink)
    return y.squeeze(0) if unbatched else y
