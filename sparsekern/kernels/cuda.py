"""The ``cuda`` backend: CUDA kernels from ``csrc/cuda`` (GPU fallback when Triton refuses a call)."""

from __future__ import annotations

from .._backends import Backend, CallInfo


class CudaBackend(Backend):
    name = "cuda"

    def available(self) -> tuple[bool, str]:
        return False, "the CUDA kernels are not part of this build yet"

    def supports(self, info: CallInfo) -> tuple[bool, str]:
        return False, "not available"
