"""sparsekern: sparse matmul and conv2d kernels for training, with drop-in PyTorch modules.

Importing this package touches neither Triton, nor the compiled extension, nor CUDA.
"""

from __future__ import annotations

from . import choice, formats, masks, optim
from ._backends import BACKEND_NAMES, BackendError, get_backend, select_backend
from .choice import explain
from .convert import SparsityConfig, dense_state_dict, densify_, sparse_modules, sparsify_
from .formats import Pattern, from_torch_sparse, pattern_of, to_torch_sparse_bsr, to_torch_sparse_csr
from .nn import SparseConv2d, SparseLinear
from .ops import sddmm, sparse_conv2d, sparse_linear, spmm

__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES",
    "BackendError",
    "Pattern",
    "SparseConv2d",
    "SparseLinear",
    "SparsityConfig",
    "dense_state_dict",
    "choice",
    "densify_",
    "explain",
    "formats",
    "from_torch_sparse",
    "get_backend",
    "masks",
    "optim",
    "pattern_of",
    "select_backend",
    "sddmm",
    "sparse_conv2d",
    "sparse_linear",
    "sparse_modules",
    "sparsify_",
    "spmm",
    "to_torch_sparse_bsr",
    "to_torch_sparse_csr",
]
