"""Compiled and JIT kernels behind the ``cpp``, ``triton`` and ``cuda`` backends (imported lazily)."""
