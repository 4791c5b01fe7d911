"""Launch helpers shared by the Triton kernel modules (imports Triton: load lazily).

* whether kernels are interpreted (``TRITON_INTERPRET``, read by ``@triton.jit`` when a kernel
  module is first imported, so it is recorded here once for the whole process);
* the ``tl.dot`` input precision for fp32;
* output allocation, which tests can switch to NaN-filled to catch unwritten elements;
* the autotune wrapper: autotuned on a GPU, one fixed configuration under the interpreter (where
  timing is meaningless and each launch is slow), or an explicit configuration when given.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

# Fixed when the kernel modules are imported: @triton.jit reads TRITON_INTERPRET at decoration.
INTERPRET: bool = bool(knobs.runtime.interpret)

# Tests set this to fill every output a kernel is meant to overwrite with NaN first.
FILL_OUTPUTS_WITH_NAN: bool = False

PRECISIONS = ("ieee", "tf32", "tf32x3")

_TORCH_TO_TL_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def cdiv(a: int, b: int) -> int:
    """Host-side ceil division (``triton.cdiv`` goes through Triton's constexpr machinery: slower)."""
    return -(-a // b)


def pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def empty(shape, *, dtype, device) -> torch.Tensor:
    """An output buffer that the kernel overwrites completely."""
    if FILL_OUTPUTS_WITH_NAN:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def resolve_precision(dtype: torch.dtype, precision: str | None) -> str:
    """``tl.dot`` input precision: IEEE for fp32 unless TF32 is asked for (or allowed by torch).

    ``None`` follows ``torch.get_float32_matmul_precision()``: ``"highest"`` (PyTorch's default)
    means IEEE fp32, anything else TF32, so the Triton backend rounds like cuBLAS would.  Half
    dtypes multiply natively whatever the precision says.
    """
    if precision is None:
        precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS} or None, got {precision!r}")
    if dtype != torch.float32:
        return "ieee"
    return precision


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands are converted to fp32 before the product.

    Triton 3.9's interpreter returns garbage for a bf16 ``tl.dot`` (fp16 is fine), so the
    interpreter multiplies bf16 tiles in fp32: bf16 x bf16 products are exact in fp32, so the
    result is the one a tensor core with fp32 accumulation gives, up to summation order.
    """
    return INTERPRET and dtype == torch.bfloat16


def acc_dtype(dtype: torch.dtype):
    """Accumulator dtype of the kernels: fp32, or fp64 for fp64 operands."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_operand(t: torch.Tensor, name: str, *, dim: int, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous() first)")


def check_dtype(dtype: torch.dtype, name: str) -> None:
    if dtype not in _TORCH_TO_TL_SUPPORTED:
        raise TypeError(f"{name}: expected float32, float16 or bfloat16 (float64 under the interpreter), got {dtype}")


class Tuned:
    """A kernel plus its tuning space: autotuned on GPU, fixed under the interpreter.

    Args:
        kernel: the ``@triton.jit`` function.
        configs: candidate ``triton.Config`` objects (meta-parameters only).
        key: argument names whose values select a tuned configuration.
        interpret_config: the meta-parameters used under the interpreter.
        fit: ``fit(meta, args) -> meta`` clamps a configuration to the call (block sizes), so one
            list of configurations serves every block size.
    """

    def __init__(self, kernel, configs, key, interpret_config: dict, fit=None):
        self.kernel = kernel
        self.interpret_config = dict(interpret_config)
        self.fit = fit or (lambda meta, args: meta)
        self._tuned = None
        if not INTERPRET:

            def prune(configs, named_args, **kwargs):
                seen, out = set(), []
                for c in configs:
                    meta = self.fit(dict(c.kwargs), {**named_args, **kwargs})
                    sig = (tuple(sorted(meta.items())), c.num_warps, c.num_stages)
                    if sig not in seen:
                        seen.add(sig)
                        out.append(triton.Config(meta, num_warps=c.num_warps, num_stages=c.num_stages))
                return out

            # cache_results: tuned choices persist in Triton's cache dir, so a new process skips the search
            self._tuned = triton.autotune(
                configs=configs, key=key, prune_configs_by={"early_config_prune": prune}, cache_results=True
            )(kernel)

    def __call__(self, grid, args: dict, config: dict | None = None):
        """Launch with ``args`` (runtime arguments and fixed constexprs) on ``grid(meta)``.

        ``config`` (meta-parameters, optionally ``num_warps`` / ``num_stages``) bypasses tuning.
        """
        if config is None and self._tuned is not None:
            return self._tuned[grid](**args)
        meta = dict(self.interpret_config if config is None else config)
        launch = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
        meta = self.fit(meta, args)
        return self.kernel[grid](**args, **meta, **launch)
