"""The specification: the simplest PyTorch definitions of every op, and the last-resort backend.

With weight mask ``M`` and gradient mask ``G`` (the effective ``G`` is always ``G & M``):

* ``fwd``, forward           ``y  = x (W⊙M)ᵀ + b``          (conv: ``conv2d(x, W⊙M) + b``)
* ``dx``, input gradient     ``dx = dy (W⊙M)``               (conv: transposed conv with ``W⊙M``)
* ``dw``, weight gradient    ``dW = (dyᵀ x) ⊙ G``, exactly zero outside ``G``
* bias gradient              ``db = Σ dy``

as ``linear_fwd / linear_dx / linear_dw`` and ``conv2d_fwd / conv2d_dx / conv2d_dw``.

Masking uses ``masked_fill`` rather than a multiply, so a non-finite value stored at a pruned
position never leaks into a result (the kernels do not read pruned positions either).
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
]


def _masked(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return weight.masked_fill(~mask, 0)


def linear_fwd(x, weight, bias, mask):
    """``x [N, K] @ (W⊙M)ᵀ [K, M] + b`` -> ``[N, M]``."""
    return F.linear(x, _masked(weight, mask), bias)


def linear_dx(dy, weight, mask):
    """``dy [N, M] @ (W⊙M) [M, K]`` -> ``[N, K]``."""
    return dy @ _masked(weight, mask)


def linear_dw(dy, x, grad_mask):
    """``(dyᵀ [M, N] @ x [N, K]) ⊙ G`` -> ``[M, K]``, exact zeros outside ``G``."""
    return (dy.t() @ x).masked_fill(~grad_mask, 0)


def conv2d_fwd(x, weight, bias, mask, conv: ConvParams):
    return F.conv2d(x, _masked(weight, mask), bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def conv2d_dx(dy, weight, mask, input_shape, conv: ConvParams):
    return torch.nn.grad.conv2d_input(
        list(input_shape), _masked(weight, mask), dy, conv.stride, conv.padding, conv.dilation, conv.groups
    )


def conv2d_dw(dy, x, grad_mask, weight_shape, conv: ConvParams):
    dw = torch.nn.grad.conv2d_weight(x, list(weight_shape), dy, conv.stride, conv.padding, conv.dilation, conv.groups)
    return dw.masked_fill(~grad_mask, 0)


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
