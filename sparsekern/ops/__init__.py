"""Public functional ops (autograd-enabled), one module per op stem."""

from .conv2d import sparse_conv2d
from .linear import sparse_linear
from .sddmm import sddmm
from .spmm import spmm

__all__ = ["sparse_linear", "sparse_conv2d", "spmm", "sddmm"]
