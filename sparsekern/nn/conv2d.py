"""``SparseConv2d``: a drop-in ``nn.Conv2d`` whose weight is masked and whose gradient is masked."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.conv2d import sparse_conv2d
from ._base import SparseMixin, dense_weight_of, mask_from_module, shareable


class SparseConv2d(SparseMixin, nn.Conv2d):
    """``nn.Conv2d`` with a weight mask ``M`` and a gradient mask ``G ⊆ M``.

    Same constructor, parameters and ``state_dict`` keys as ``nn.Conv2d`` (every padding mode)
    plus two boolean buffers, ``weight_mask`` and ``grad_mask``.  For ``layout="block"`` a tile
    covers ``bo`` output channels by ``bk`` input channels and every kernel tap.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
        padding_mode, device, dtype: as ``nn.Conv2d``.
        sparsity, layout, block_size, backend, mask: as :class:`SparseLinear`.

    Example:
        >>> conv = SparseConv2d(16, 32, 3, padding=1, sparsity=0.9)
        >>> conv(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        sparsity: float = 0.0,
        layout: str = "unstructured",
        block_size=None,
        backend: str | None = None,
        mask: torch.Tensor | None = None,
    ) -> None:
        if isinstance(out_channels, int) and out_channels < 1:  # nn.Conv2d would fail only at its forward
            raise ValueError(f"out_channels: expected an integer >= 1, got {out_channels!r}")
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self._init_sparse(sparsity, layout, block_size, backend, mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        y = sparse_conv2d(
            x,
            self.weight,
            self.bias,
            self.weight_mask,
            self.grad_mask,
            self.stride,
            padding,
            self.dilation,
            self.groups,
            backend=self.backend,
            layout=self.layout,
            block_size=self.block_size,
            sink=None if torch.compiler.is_compiling() else self._grad_sink(),
        )
        if not torch.compiler.is_compiling():  # the traced op decides when it runs
            self._note_choice()
        return y

    @classmethod
    def from_dense(
        cls, module: nn.Conv2d, mask: torch.Tensor | str | None = None, *, share: bool = False, **kwargs
    ) -> SparseConv2d:
        """A ``SparseConv2d`` with ``module``'s weights (copied, or taken with ``share=True``) and
        ``mask``; see ``SparseLinear.from_dense``."""
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"module: expected nn.Conv2d, got {type(module).__name__}")
        weight = dense_weight_of(module)
        if mask is None:
            mask = mask_from_module(module)
        sparsity = kwargs.pop("sparsity", 0.0)
        share = share and shareable(module, weight)
        new = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            module.padding_mode,
            device="meta" if share else weight.device,
            dtype=weight.dtype,
            **kwargs,
        )
        new._copy_from(module, weight, mask, sparsity, share)
        return new

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing the same function (weights outside the mask set to zero)."""
        out = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
            self.padding_mode,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        return self._dense_copy(out)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._sparse_repr()
