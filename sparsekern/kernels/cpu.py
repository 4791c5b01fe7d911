"""The ``cpp`` backend: C++ CPU kernels from ``csrc/`` registered as ``torch.ops.sparsekern.*``."""

from __future__ import annotations

from .._backends import Backend, CallInfo


class CppBackend(Backend):
    name = "cpp"

    def available(self) -> tuple[bool, str]:
        return False, "the C++ kernels (sparsekern._C) are not part of this build yet"

    def supports(self, info: CallInfo) -> tuple[bool, str]:
        return False, "not available"
