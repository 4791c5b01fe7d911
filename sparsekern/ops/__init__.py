"""Public functional ops (autograd-enabled)."""

from .conv2d import sparse_conv2d
from .linear import sddmm, sparse_linear, spmm

__all__ = ["sparse_linear", "sparse_conv2d", "spmm", "sddmm"]
