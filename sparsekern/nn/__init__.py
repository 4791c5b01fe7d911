"""Drop-in sparse modules."""

from .conv2d import SparseConv2d
from .linear import SparseLinear

__all__ = ["SparseLinear", "SparseConv2d"]
