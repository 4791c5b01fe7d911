"""The ``triton`` backend (GPU; CPU tensors under ``TRITON_INTERPRET=1``).  Triton is imported lazily."""

from __future__ import annotations

from ..._backends import Backend, CallInfo


class TritonBackend(Backend):
    name = "triton"

    def available(self) -> tuple[bool, str]:
        return False, "the Triton kernels are not part of this build yet"

    def supports(self, info: CallInfo) -> tuple[bool, str]:
        return False, "not available"
