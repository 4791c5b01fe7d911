"""Dense times masked-sparse: ``spmm`` (the linear trio, dispatched as op ``"spmm"``)."""

from __future__ import annotations

import torch

from ..formats import BlockSize, Pattern
from ._common import check_mask, check_weight
from .linear import linear

__all__ = ["spmm"]


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
        weight, mask: ``[M, K]``; see :func:`~sparsekern.sparse_linear`.

    Differentiable in ``a`` and ``weight`` (the weight gradient on ``mask`` only).
    """
    if transpose:
        return linear(a, weight, None, mask, None, backend=backend, layout=layout, block_size=block_size, op="spmm")
    if isinstance(mask, Pattern):
        raise TypeError("mask: spmm(transpose=False) takes a boolean tensor, not a Pattern")
    check_weight(weight)
    check_mask(mask, weight, "mask")
    if isinstance(block_size, (tuple, list)) and len(block_size) == 2:  # the tile of the transpose
        rows, cols = block_size
        block_size = BlockSize(cols, rows) if isinstance(block_size, BlockSize) else (cols, rows)
    wt, mt = weight.t().contiguous(), mask.t().contiguous()
    return linear(a, wt, None, mt, None, backend=backend, layout=layout, block_size=block_size, op="spmm")
