"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight is masked and whose gradient is masked."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.linear import sparse_linear
from ._base import SparseMixin, dense_weight_of, mask_from_module, shareable


class SparseLinear(SparseMixin, nn.Linear):
    """``nn.Linear`` with a weight mask ``M`` and a gradient mask ``G ⊆ M``.

    Same constructor, parameters and ``state_dict`` keys as ``nn.Linear`` plus two boolean
    buffers, ``weight_mask`` and ``grad_mask``.  The forward computes ``x (W⊙M)ᵀ + b`` on the
    selected backend; the backward computes ``dW`` on ``G`` only (exact zeros elsewhere).

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        sparsity: initial sparsity in ``[0, 1)``, by weight magnitude (0: dense mask).
        layout: ``"unstructured"`` or ``"block"``; block_size: ``b`` or ``(bo, bk)``.
        backend: force a backend for this layer (``None``: automatic).
        mask: an initial boolean mask (overrides ``sparsity``).

    Example:
        >>> layer = SparseLinear(64, 32, sparsity=0.9)
        >>> layer(torch.randn(8, 64)).shape
        torch.Size([8, 32])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        sparsity: float = 0.0,
        layout: str = "unstructured",
        block_size=None,
        backend: str | None = None,
        mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_sparse(sparsity, layout, block_size, backend, mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = sparse_linear(
            x,
            self.weight,
            self.bias,
            self.weight_mask,
            self.grad_mask,
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
        cls, module: nn.Linear, mask: torch.Tensor | str | None = None, *, share: bool = False, **kwargs
    ) -> SparseLinear:
        """A ``SparseLinear`` with ``module``'s weights (copied) and ``mask``.

        Without ``mask``: the ``weight_mask`` left by ``torch.nn.utils.prune`` if present, else
        ``kwargs['sparsity']`` by magnitude, else dense (with a warning when the weight is mostly
        zeros).  ``mask="nonzero"``: the weight's nonzero pattern.  ``kwargs``: layout,
        block_size, backend, sparsity.  ``share=True`` takes ``module``'s weight and bias
        Parameters instead of copying them (no second weight in memory; an optimizer built on
        them keeps working): ``module`` is then not to be used on its own, since the weights
        outside the mask are zeroed in place.  ``sparsify_`` converts this way.
        """
        if not isinstance(module, nn.Linear):
            raise TypeError(f"module: expected nn.Linear, got {type(module).__name__}")
        weight = dense_weight_of(module)
        if mask is None:
            mask = mask_from_module(module)
        sparsity = kwargs.pop("sparsity", 0.0)
        share = share and shareable(module, weight)
        new = cls(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device="meta" if share else weight.device,
            dtype=weight.dtype,
            **kwargs,
        )
        new._copy_from(module, weight, mask, sparsity, share)
        return new

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function (weights outside the mask set to zero)."""
        out = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        return self._dense_copy(out)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._sparse_repr()
