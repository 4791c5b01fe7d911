"""The ``cuda`` backend: CUDA kernels from ``csrc/cuda`` (the GPU fallback when Triton is absent or
refuses a call).

They implement the CUDA dispatch key of the same ops as the ``cpp`` backend
(``torch.ops.sparsekern.linear_fwd / linear_dx / linear_dw``, unstructured and block layouts) and
are compiled into ``sparsekern._C`` only when a CUDA build of torch is present and
``SPARSEKERN_CUDA=1`` is set at install time (see ``setup.py``).  Conv2d is not implemented here
(the Triton backend covers it on GPUs; otherwise the reference runs).
"""

from __future__ import annotations

import torch

from .._backends import LINEAR_OPS, CallInfo
from .cpu import CppBackend

__all__ = ["CudaBackend"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _has_cuda_kernels() -> tuple[bool, str]:
    if torch.version.cuda is None:
        return False, "this torch build has no CUDA"
    from .cpu import load_library

    ok, why = load_library()
    if not ok:
        return False, why
    if not torch._C._dispatch_has_kernel_for_dispatch_key("sparsekern::linear_fwd", "CUDA"):
        return False, "sparsekern._C was built without its CUDA kernels (reinstall with SPARSEKERN_CUDA=1)"
    return True, ""


class CudaBackend(CppBackend):
    """CSR / BSR SpMM and SDDMM in plain CUDA: linear, spmm and sddmm, fp16 / bf16 / fp32 / fp64.

    The linear trio is the ``cpp`` backend's: the same ``torch.ops.sparsekern`` ops with the same
    metadata, which dispatch to their CUDA kernels for CUDA tensors.
    """

    name = "cuda"
    channels_last = False

    def available(self) -> tuple[bool, str]:
        return _has_cuda_kernels()

    def supports(self, info: CallInfo) -> tuple[bool, str]:
        if info.device.type != "cuda":
            return False, f"runs on CUDA tensors only, got {info.device.type}"
        if info.op not in LINEAR_OPS:
            return False, f"implements linear (and spmm, sddmm) only, not {info.op}"
        if info.dtype not in _DTYPES:
            return False, f"supports {', '.join(str(d) for d in _DTYPES)}, got {info.dtype}"
        return True, ""
