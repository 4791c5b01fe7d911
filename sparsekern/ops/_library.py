"""Registered ops for traced calls (``torch.compile``, ``torch.export``).

Under tracing, :func:`sparsekern.sparse_linear` and :func:`sparsekern.sparse_conv2d` (and so the
modules) become one call each of ``torch.ops.sparsekern.sparse_linear`` /
``torch.ops.sparsekern.sparse_conv2d``, custom ops (:func:`torch.library.custom_op`) with a
``register_fake`` for shapes and a ``register_autograd`` whose backward is another such op.  Their
inputs are the tensors (masks included) and plain arguments; the graph holds no ``nonzero``,
``bincount`` or comparison on a mask, so it has no graph break and does not depend on the mask's
contents.

When an op runs, it does what the eager call does: the mask's :class:`~sparsekern.formats.Pattern`
and its metadata come from the mask's :class:`~sparsekern.formats.MetaCache` (built on the first
call after a mask change, outside any traced region, and reused until the next change), the
backend is selected as in eager mode, and an automatic call takes the same
:mod:`sparsekern.choice` decision as the eager call with the same key.  So a compiled model gives
the eager model's results, and a mask written between steps (``set_mask``, a prune, a loaded state
dict) is picked up without recompiling.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import choice
from .._backends import CallInfo, ConvParams, is_automatic, select_backend
from ..formats import BlockSize, Pattern, pattern_block, pattern_of
from ._common import grad_pattern

__all__ = ["traced_linear", "traced_conv2d"]


def _plain_mask(mask, name: str) -> Tensor | None:
    if isinstance(mask, Pattern):
        raise TypeError(f"{name}: a traced call (torch.compile / torch.export) takes a boolean tensor, not a Pattern")
    return mask


def _block_arg(mask: Tensor, layout: str, block_size) -> list[int]:
    """The matrix tile of a call as an op argument (``[]`` for ``"unstructured"``)."""
    block = pattern_block(mask, layout, block_size)
    return [] if block is None else [block.rows, block.cols]


def _resolve(op, x, weight, bias, mask, grad_mask, layout, block, backend, training, conv=None):
    """``(pattern, grad pattern, backend)`` of a call, as the eager call resolves them."""
    pattern = pattern_of(mask, layout, BlockSize(*block) if block else None)
    gpattern = grad_pattern(pattern, grad_mask)
    shape = tuple(weight.shape) if conv is not None else None
    info = CallInfo(op, weight.device, weight.dtype, pattern.layout, pattern.block_size, gpattern.layout, conv, shape)
    requested = backend or None
    be = select_backend(info, requested)
    if op in ("linear", "conv2d") and is_automatic(requested):
        be = choice.choose(op, be, x, weight, bias, pattern, gpattern, conv, training=training)
    return pattern, gpattern, be


def _training(x: Tensor, weight: Tensor) -> bool:
    return torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)


def _none_if_empty(t: Tensor, needed: bool) -> Tensor | None:
    return t if needed else None


# ------------------------------------------------------------------------------------------------
# linear (and spmm): x is 2-D and contiguous
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("sparsekern::sparse_linear", mutates_args=())
def _linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor,
    grad_mask: Tensor | None,
    layout: str,
    block: list[int],
    backend: str,
    op: str,
    training: bool,
) -> Tensor:
    pattern, _, be = _resolve(op, x, weight, bias, mask, grad_mask, layout, block, backend, training)
    return be.linear_fwd(x, weight, bias, pattern).contiguous()


@_linear.register_fake
def _(x, weight, bias, mask, grad_mask, layout, block, backend, op, training):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("sparsekern::sparse_linear_backward", mutates_args=())
def _linear_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    mask: Tensor,
    grad_mask: Tensor | None,
    layout: str,
    block: list[int],
    backend: str,
    op: str,
    training: bool,
    need_dx: bool,
    need_dw: bool,
) -> tuple[Tensor, Tensor]:
    from .linear import linear_grads

    pattern, gpattern, be = _resolve(op, x, weight, None, mask, grad_mask, layout, block, backend, training)
    dx, dw = linear_grads(dy.contiguous(), x, weight, pattern, gpattern, be, need_dx, need_dw)
    # an empty tensor stands for a gradient not asked for (an op returns tensors only)
    return (x.new_empty(0) if dx is None else dx.contiguous()), (x.new_empty(0) if dw is None else dw.contiguous())


@_linear_backward.register_fake
def _(dy, x, weight, *args):
    need_dx, need_dw = args[-2:]
    return x.new_empty(x.shape if need_dx else 0), x.new_empty(weight.shape if need_dw else 0)


def _setup(ctx, inputs, output) -> None:
    x, weight, bias, mask, grad_mask, *args = inputs
    ctx.save_for_backward(x, weight, mask, grad_mask)
    ctx.args, ctx.has_bias = args, bias is not None


def _linear_grad(ctx, dy):
    x, weight, mask, grad_mask = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw = _linear_backward(dy, x, weight, mask, grad_mask, *ctx.args, need[0], need[1])
    db = dy.sum(0) if ctx.has_bias and need[2] else None
    return _none_if_empty(dx, need[0]), _none_if_empty(dw, need[1]), db, None, None, None, None, None, None, None


_linear.register_autograd(_linear_grad, setup_context=_setup)


def traced_linear(x, weight, bias, mask, grad_mask, backend, layout, block_size, op) -> Tensor:
    """``sparse_linear`` (``op="linear"``) or ``spmm`` of a checked 2-D contiguous ``x``, as one op."""
    mask = _plain_mask(mask, "mask")
    grad_mask = _plain_mask(grad_mask, "grad_mask")
    block = _block_arg(mask, layout, block_size)
    return _linear(x, weight, bias, mask, grad_mask, layout, block, backend or "", op, _training(x, weight))


# ------------------------------------------------------------------------------------------------
# conv2d: x is 4-D; the output keeps x's memory format (NCHW or channels-last)
# ------------------------------------------------------------------------------------------------


def _channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` in ``x``'s memory format, so the real op's strides are those of its fake."""
    return t.contiguous(memory_format=torch.channels_last if _channels_last(x) else torch.contiguous_format)


def _conv_out(x, weight, stride, padding, dilation) -> tuple[int, int, int, int]:
    hw = [
        (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
        for i in range(2)
    ]
    return (x.shape[0], weight.shape[0], hw[0], hw[1])


@torch.library.custom_op("sparsekern::sparse_conv2d", mutates_args=())
def _conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor,
    grad_mask: Tensor | None,
    layout: str,
    block: list[int],
    backend: str,
    training: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> Tensor:
    from .conv2d import _dense_layout

    conv = ConvParams(tuple(stride), tuple(padding), tuple(dilation), groups)
    pattern, _, be = _resolve("conv2d", x, weight, bias, mask, grad_mask, layout, block, backend, training, conv)
    return _like(be.conv2d_fwd(_dense_layout(x, be), weight, bias, pattern, conv), x)


@_conv2d.register_fake
def _(x, weight, bias, mask, grad_mask, layout, block, backend, training, stride, padding, dilation, groups):
    return _like(x.new_empty(_conv_out(x, weight, stride, padding, dilation)), x)


@torch.library.custom_op("sparsekern::sparse_conv2d_backward", mutates_args=())
def _conv2d_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    mask: Tensor,
    grad_mask: Tensor | None,
    layout: str,
    block: list[int],
    backend: str,
    training: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    need_dx: bool,
    need_dw: bool,
) -> tuple[Tensor, Tensor]:
    from .conv2d import _dense_layout, conv2d_grads

    conv = ConvParams(tuple(stride), tuple(padding), tuple(dilation), groups)
    pattern, gpattern, be = _resolve("conv2d", x, weight, None, mask, grad_mask, layout, block, backend, training, conv)
    x = _dense_layout(x, be)
    dx, dw = conv2d_grads(_dense_layout(dy, be), x, weight, pattern, gpattern, conv, be, need_dx, need_dw)
    return (x.new_empty(0) if dx is None else _like(dx, x)), (x.new_empty(0) if dw is None else dw.contiguous())


@_conv2d_backward.register_fake
def _(dy, x, weight, *args):
    need_dx, need_dw = args[-2:]
    dx = _like(x.new_empty(x.shape), x) if need_dx else x.new_empty(0)
    return dx, x.new_empty(weight.shape if need_dw else 0)


def _conv2d_grad(ctx, dy):
    x, weight, mask, grad_mask = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw = _conv2d_backward(dy, x, weight, mask, grad_mask, *ctx.args, need[0], need[1])
    db = dy.sum((0, 2, 3)) if ctx.has_bias and need[2] else None
    return (_none_if_empty(dx, need[0]), _none_if_empty(dw, need[1]), db) + (None,) * 10


_conv2d.register_autograd(_conv2d_grad, setup_context=_setup)


def traced_conv2d(x, weight, bias, mask, grad_mask, conv: ConvParams, backend, layout, block_size) -> Tensor:
    """``sparse_conv2d`` of a checked, padded 4-D ``x`` as one op."""
    mask = _plain_mask(mask, "mask")
    grad_mask = _plain_mask(grad_mask, "grad_mask")
    block = _block_arg(mask, layout, block_size)
    return _conv2d(
        x,
        weight,
        bias,
        mask,
        grad_mask,
        layout,
        block,
        backend or "",
        _training(x, weight),
        list(conv.stride),
        list(conv.padding),
        list(conv.dilation),
        conv.groups,
    )
