"""The ``triton`` backend: block-sparse (BSR) and unstructured (CSR) Triton kernels for linear and conv2d.

GPU tensors run compiled kernels; CPU tensors run in Triton's interpreter when
``TRITON_INTERPRET=1`` is set before the kernels are first used (that is how CI checks them).
Triton is imported only inside the methods below and in the kernel modules (``bsr``, ``csr``, ``conv``),
which load on first use, so ``import sparsekern`` neither needs Triton nor initialises CUDA.

What the verifier (:meth:`TritonBackend.supports`) accepts, and why it refuses the rest:

* ops ``linear``, ``spmm``, ``sddmm`` (all three on the linear kernels) and ``conv2d`` (groups=1;
  block tiles of 16..128 output by 16..128 input channels spanning every kernel tap);
* CUDA tensors on compute capability 8.0+ (ROCm devices are passed through to Triton), or CPU
  tensors under the interpreter;
* float32, float16, bfloat16 (fp32 accumulation); float64 only under the interpreter (fp64
  accumulation), which makes ``gradcheck`` possible there;
* block layouts whose tile sides are 16, 32, 64 or 128; any unstructured pattern.  The gradient
  pattern may be unstructured while the weight pattern is block: the weight gradient then runs the
  unstructured SDDMM on exactly ``G``.
* no alignment requirement: every load and store is masked at the edges, so sizes that are not
  multiples of the block (or of 16 bytes) run; Triton specialises on 16-byte alignment when the
  pointers and sizes happen to have it.

fp32 products use IEEE precision unless ``torch.get_float32_matmul_precision()`` allows TF32
(PyTorch's default does not), or ``TritonBackend(fp32_precision=...)`` says otherwise.
"""

from __future__ import annotations

import importlib.util
import sys

import torch

from ..._backends import LINEAR_OPS, OPS, Backend, BackendError, CallInfo

__all__ = ["TritonBackend"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK_SIDES = (16, 32, 64, 128)
_MIN_CAPABILITY = (8, 0)


def _interpret_requested() -> bool:
    """``TRITON_INTERPRET`` as Triton reads it (only called once Triton is known to import)."""
    from triton import knobs

    return bool(knobs.runtime.interpret)


def _kernels_interpreted() -> bool | None:
    """How the loaded kernel modules were built (None: not loaded yet, so the env var decides)."""
    mod = sys.modules.get(f"{__name__}._launch")
    return None if mod is None else bool(mod.INTERPRET)


def _conv_supported(info: CallInfo) -> tuple[bool, str]:
    """conv2d: groups=1; a block tile must cover 16..128 output by 16..128 input channels."""
    if info.conv is not None and info.conv.groups != 1:
        return False, f"conv2d groups={info.conv.groups}: the Triton conv kernels support groups=1"
    if info.layout == "block" and info.block_size is not None:
        if info.weight_shape is None:
            return False, "conv2d block layout without the weight shape: cannot tell the channel tile"
        taps = info.weight_shape[2] * info.weight_shape[3]
        bo, bkk = info.block_size
        if bkk % taps or bo not in _BLOCK_SIDES or bkk // taps not in _BLOCK_SIDES:
            return False, f"conv2d block {info.block_size}: tiles must cover 16..128 output x 16..128 input channels"
    return True, ""


class TritonBackend(Backend):
    """Triton kernels for the linear and conv2d trios (``fwd``, ``dx``, ``dw`` on ``G``).

    Args:
        fp32_precision: ``tl.dot`` input precision for fp32 (``"ieee"``, ``"tf32"``,
            ``"tf32x3"``); ``None`` follows ``torch.get_float32_matmul_precision()``.
    """

    name = "triton"
    channels_last = True  # the conv kernels read NCHW and channels-last tensors through strides

    def __init__(self, fp32_precision: str | None = None) -> None:
        if fp32_precision not in (None, "ieee", "tf32", "tf32x3"):
            raise ValueError(f"fp32_precision: expected 'ieee', 'tf32', 'tf32x3' or None, got {fp32_precision!r}")
        self.fp32_precision = fp32_precision

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed (pip install 'sparsekern[triton]')"
        try:
            import triton  # noqa: F401
        except Exception as exc:  # a broken install makes the backend unavailable, not the package
            return False, f"triton failed to import: {exc}"
        return True, ""

    def _interpreted(self) -> bool:
        built = _kernels_interpreted()
        return _interpret_requested() if built is None else built

    def supports(self, info: CallInfo) -> tuple[bool, str]:
        if info.op not in OPS:
            return False, f"op {info.op!r}: the Triton backend has linear (spmm, sddmm) and conv2d kernels"
        if info.op == "conv2d":
            ok, why = _conv_supported(info)
            if not ok:
                return False, why
        interp = self._interpreted()
        if info.dtype == torch.float64:
            if not interp:
                return False, "dtype torch.float64: supported only under the Triton interpreter (TRITON_INTERPRET=1)"
        elif info.dtype not in _DTYPES:
            return False, f"dtype {info.dtype}: expected float32, float16 or bfloat16"
        for layout, block, what in ((info.layout, info.block_size, "weight"), (info.grad_layout, None, "gradient")):
            if layout not in ("unstructured", "block"):
                return False, f"{what} layout {layout!r}: expected 'unstructured' or 'block'"
            if (
                info.op in LINEAR_OPS
                and layout == "block"
                and block is not None
                and any(s not in _BLOCK_SIDES for s in block)
            ):
                return False, f"block size {tuple(block)}: tile sides must be one of {_BLOCK_SIDES}"
        dev = info.device
        if dev.type == "cpu":
            if not interp:
                if _kernels_interpreted() is False:
                    return False, (
                        "CPU tensors need the Triton interpreter, but the kernels were already compiled for the "
                        "GPU in this process (set TRITON_INTERPRET=1 before sparsekern's Triton kernels are first used)"
                    )
                return (
                    False,
                    "CPU tensors run only in the Triton interpreter: set TRITON_INTERPRET=1 (slow; for testing)",
                )
        elif dev.type == "cuda":
            if not interp and torch.version.hip is None:
                cap = torch.cuda.get_device_capability(dev)
                if cap < _MIN_CAPABILITY:
                    return False, (
                        f"device {dev}: compute capability {cap[0]}.{cap[1]}; the Triton kernels need "
                        f"{_MIN_CAPABILITY[0]}.{_MIN_CAPABILITY[1]}+ (Ampere or newer)"
                    )
        else:
            return (
                False,
                f"device type {dev.type!r}: Triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)",
            )
        return True, ""

    # ----------------------------------------------------------------------------------------
    # linear trio
    # ----------------------------------------------------------------------------------------

    @staticmethod
    def _block_meta(pattern, what: str):
        meta = pattern.bsr()
        if any(s not in _BLOCK_SIDES for s in meta.block):
            raise BackendError(f"triton: {what} block size {meta.block}: tile sides must be one of {_BLOCK_SIDES}")
        return meta

    def linear_fwd(self, x, weight, bias, pattern):
        if pattern.layout == "block":
            from .bsr import bsr_linear_fwd

            return bsr_linear_fwd(
                x, weight.contiguous(), bias, self._block_meta(pattern, "weight"), precision=self.fp32_precision
            )
        from .csr import csr_linear_fwd

        return csr_linear_fwd(x, weight.contiguous(), bias, pattern.csr())

    def linear_dx(self, dy, weight, pattern):
        if pattern.layout == "block":
            from .bsr import bsr_linear_dx

            return bsr_linear_dx(
                dy, weight.contiguous(), self._block_meta(pattern, "weight"), precision=self.fp32_precision
            )
        from .csr import csr_linear_dx

        return csr_linear_dx(dy, weight.contiguous(), pattern.csr())

    def linear_dw(self, dy, x, grad_pattern):
        if grad_pattern.layout == "block":
            from .bsr import bsr_linear_dw

            return bsr_linear_dw(dy, x, self._block_meta(grad_pattern, "gradient"), precision=self.fp32_precision)
        from .csr import csr_linear_dw

        return csr_linear_dw(dy, x, grad_pattern.csr())

    # ----------------------------------------------------------------------------------------
    # conv2d trio (implicit GEMM, see conv.py)
    # ----------------------------------------------------------------------------------------

    def conv2d_fwd(self, x, weight, bias, pattern, conv):
        from . import conv as tc

        if pattern.layout == "block":
            return tc.bsr_conv2d_fwd(x, weight.contiguous(), bias, pattern.bsr(), conv, precision=self.fp32_precision)
        return tc.csr_conv2d_fwd(x, weight.contiguous(), bias, pattern.csr(), conv)

    def conv2d_dx(self, dy, weight, pattern, input_shape, conv):
        from . import conv as tc

        if pattern.layout == "block":
            return tc.bsr_conv2d_dx(
                dy, weight.contiguous(), pattern.bsr(), input_shape, conv, precision=self.fp32_precision
            )
        return tc.csr_conv2d_dx(dy, weight.contiguous(), pattern.csr(), input_shape, conv)

    def conv2d_dw(self, dy, x, grad_pattern, weight_shape, conv):
        from . import conv as tc

        if grad_pattern.layout == "block":
            return tc.bsr_conv2d_dw(dy, x, grad_pattern.bsr(), weight_shape, conv, precision=self.fp32_precision)
        return tc.csr_conv2d_dw(dy, x, grad_pattern.csr(), weight_shape, conv)
