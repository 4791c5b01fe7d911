"""The ``cpp`` backend: C++ CPU kernels from ``csrc/`` registered as ``torch.ops.sparsekern.*``.

The compiled library ``sparsekern._C`` registers the ops (schemas and CPU implementations);
this module imports it on first use, adds a ``register_fake`` per op (so ``torch.compile`` and
``torch.library.opcheck`` can trace them), and adapts :class:`~sparsekern.formats.Pattern`
metadata to the ops' arguments.

Ops (``block`` is the :class:`~sparsekern.formats.BlockSize` tile in matrix units; ``(1, 1)`` means unstructured):

* ``linear_fwd(x, weight, bias, crow, col, block, win_ptr=None, win_idx=None, window=0)``,
  ``linear_dx(dy, weight, ccol, row, block, win_ptr=None, win_idx=None, window=0)``,
  ``linear_dw(dy, x, crow, col, block, win_ptr=None, win_idx=None, window=0)``; with the
  window-major metadata of ``csr_windows(crow, col, ncols, window)`` (unstructured only) the
  products run window by window over the columns so each window of the transposed input stays in
  L1 (see ``WINDOW_*`` below for when the backend passes it);
* ``conv2d_fwd / conv2d_dx / conv2d_dw`` for ``groups=1``, the same plus ``stride``, ``padding``,
  ``dilation`` and the input / weight size.  Each picks per shape between direct sparse
  convolution on shifted views of the input and implicit GEMM on im2col tiles (a fixed rule of
  the shapes; ``SPARSEKERN_CPU_CONV_ALGO=auto|direct|gemm`` forces one);
* ``conv2d_algo(op, input_size, weight_size, stride, padding, dilation, block, nnz, bf16=False)``: which of the
  two a conv2d op runs for a shape (``"direct"`` or ``"gemm"``), see :func:`conv2d_algo`;
* ``dwconv2d_fwd / dwconv2d_dx / dwconv2d_dw`` for depthwise convs (direct, any layout);
* ``cpu_isa(request="")``: the instruction set in use (``avx512``, ``avx2`` or ``generic``).
* ``cpu_bf16(request="")`` / ``cpu_features()``: the bf16 path in use (``avx512_bf16`` or ``widen``)
  and the bf16 features detected.
* ``parallel_backend()``: how the kernels are threaded (``openmp``, or ``serial`` in a build without it).
* ``built_with_torch()``: the torch version the library was compiled against; :func:`load_library`
  refuses a library built against another torch.
* ``csr_from_mask``, ``tile_any_all``, ``update_masks_``: the metadata builders and the mask update
  that :mod:`sparsekern.formats` and ``set_mask`` use on CPU tensors (``csrc/cpu/build_meta.cpp``).

The index metadata comes from ``pattern.csr()`` / ``pattern.bsr()``, and the column windows from
``meta.derived(...)``: all cached per mask version in the pattern's
:class:`~sparsekern.formats.MetaCache`.  The values are read from the dense weight inside each op
(they change every optimizer step), so nothing derived from the weight values is cached.
"""

from __future__ import annotations

import os

import torch

from .. import reference
from .._backends import OPS, Backend, BackendError, CallInfo

__all__ = ["CppBackend", "load_library", "OP_NAMES", "check_torch_version", "conv2d_algo"]

OP_NAMES = (
    "linear_fwd",
    "linear_dx",
    "linear_dw",
    "conv2d_fwd",
    "conv2d_dx",
    "conv2d_dw",
    "dwconv2d_fwd",
    "dwconv2d_dx",
    "dwconv2d_dw",
    "csr_windows",
    "conv2d_algo",
    "csr_from_mask",
    "tile_any_all",
    "update_masks_",
    "built_with_torch",
)

_STATE: dict = {}
_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _register_fakes() -> None:
    lib = "sparsekern::"

    @torch.library.register_fake(lib + "linear_fwd")
    def _(x, weight, bias, crow, col, block, win_ptr=None, win_idx=None, window=0):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake(lib + "linear_dx")
    def _(dy, weight, ccol, row, block, win_ptr=None, win_idx=None, window=0):
        return dy.new_empty((dy.shape[0], weight.shape[1]))

    @torch.library.register_fake(lib + "linear_dw")
    def _(dy, x, crow, col, block, win_ptr=None, win_idx=None, window=0):
        return x.new_empty((dy.shape[1], x.shape[1]))

    def conv_out_shape(in_size, w_size, stride, padding, dilation):
        ho = _conv_out(in_size[2], w_size[2], stride[0], padding[0], dilation[0])
        wo = _conv_out(in_size[3], w_size[3], stride[1], padding[1], dilation[1])
        return (in_size[0], w_size[0], ho, wo)

    @torch.library.register_fake(lib + "conv2d_fwd")
    def _(x, weight, bias, crow, col, block, stride, padding, dilation):
        return x.new_empty(conv_out_shape(x.shape, weight.shape, stride, padding, dilation))

    @torch.library.register_fake(lib + "conv2d_dx")
    def _(dy, weight, ccol, row, block, input_size, stride, padding, dilation):
        return dy.new_empty(tuple(input_size))

    @torch.library.register_fake(lib + "conv2d_dw")
    def _(dy, x, crow, col, block, weight_size, stride, padding, dilation):
        return x.new_empty(tuple(weight_size))

    @torch.library.register_fake(lib + "dwconv2d_fwd")
    def _(x, weight, bias, crow, col, stride, padding, dilation):
        return x.new_empty(conv_out_shape(x.shape, weight.shape, stride, padding, dilation))

    @torch.library.register_fake(lib + "dwconv2d_dx")
    def _(dy, weight, crow, col, input_size, stride, padding, dilation):
        return dy.new_empty(tuple(input_size))

    @torch.library.register_fake(lib + "dwconv2d_dw")
    def _(dy, x, crow, col, weight_size, stride, padding, dilation):
        return x.new_empty(tuple(weight_size))

    @torch.library.register_fake(lib + "csr_windows")
    def _(crow, col, ncols, window):
        nw = max(1, -(-ncols // window))
        return crow.new_empty((nw * crow.shape[0],)), col.new_empty(col.shape)

    # the metadata builders (csrc/cpu/build_meta.cpp): nnz is data-dependent, a fresh dynamic size
    @torch.library.register_fake(lib + "csr_from_mask")
    def _(mask, dtype):
        nnz = torch.library.get_ctx().new_dynamic_size()
        rows, cols = mask.shape
        sizes = (rows + 1, nnz, cols + 1, nnz, nnz)
        return tuple(mask.new_empty((n,), dtype=dtype) for n in sizes)

    @torch.library.register_fake(lib + "tile_any_all")
    def _(mask, bo, bk):
        grid = (-(-mask.shape[0] // bo), -(-mask.shape[1] // bk))
        return mask.new_empty(grid), mask.new_empty(grid)

    # update_masks_ has no fake: it is set_mask's eager in-place pass, and its result (a
    # data-dependent int that decides whether set_mask raises) would break any traced graph anyway


def _transposed(crow, col, block, weight) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ccol, row)``: the transposed metadata of the CSR / BSR ``(crow, col)`` of ``weight``'s matrix
    view, for the input gradient of a raw forward op (eager: it is built from the indices)."""
    from ..formats import build_csr

    rows, cols = weight.shape[0], weight[0].numel()
    grid_shape = (-(-rows // block[0]), -(-cols // block[1]))
    counts = (crow[1:] - crow[:-1]).long()
    row_ids = torch.repeat_interleave(torch.arange(grid_shape[0], device=crow.device), counts, output_size=col.numel())
    grid = torch.zeros(grid_shape, dtype=torch.bool, device=crow.device)
    grid[row_ids, col.long()] = True
    meta = build_csr(grid)
    return meta.ccol_indices.to(crow.dtype), meta.row_indices.to(crow.dtype)


def _register_autograd() -> None:
    """Backward formulas of the raw forward ops (``weight_mask == grad_mask``: the op's pattern), so
    ``torch.ops.sparsekern.linear_fwd`` / ``conv2d_fwd`` / ``dwconv2d_fwd`` are differentiable.
    Each gradient is another op of the library."""
    ops = torch.ops.sparsekern

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)][:2])
        ctx.inputs = inputs

    def linear_grad(ctx, dy):
        x, weight = ctx.saved_tensors
        _, _, bias, crow, col, block = ctx.inputs[:6]
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        dx = dw = db = None
        if need[0]:
            ccol, row = _transposed(crow, col, block, weight)
            dx = ops.linear_dx(dy, weight, ccol, row, block)
        if need[1]:
            dw = ops.linear_dw(dy, x, crow, col, block)
        if bias is not None and need[2]:
            db = dy.sum(0)
        return (dx, dw, db) + (None,) * (len(ctx.inputs) - 3)

    def conv_grad(ctx, dy):
        x, weight = ctx.saved_tensors
        _, _, bias, crow, col, *rest = ctx.inputs
        depthwise = len(rest) == 3  # dwconv2d_fwd has no block argument
        block, (stride, padding, dilation) = (None, rest) if depthwise else (rest[0], rest[1:])
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        dx = dw = db = None
        if need[0] and depthwise:
            dx = ops.dwconv2d_dx(dy, weight, crow, col, list(x.shape), stride, padding, dilation)
        elif need[0]:
            ccol, row = _transposed(crow, col, block, weight)
            dx = ops.conv2d_dx(dy, weight, ccol, row, block, list(x.shape), stride, padding, dilation)
        if need[1] and depthwise:
            dw = ops.dwconv2d_dw(dy, x, crow, col, list(weight.shape), stride, padding, dilation)
        elif need[1]:
            dw = ops.conv2d_dw(dy, x, crow, col, block, list(weight.shape), stride, padding, dilation)
        if bias is not None and need[2]:
            db = dy.sum((0, 2, 3))
        return (dx, dw, db) + (None,) * (len(ctx.inputs) - 3)

    torch.library.register_autograd("sparsekern::linear_fwd", linear_grad, setup_context=setup)
    torch.library.register_autograd("sparsekern::conv2d_fwd", conv_grad, setup_context=setup)
    torch.library.register_autograd("sparsekern::dwconv2d_fwd", conv_grad, setup_context=setup)


def check_torch_version(built: str, running: str) -> None:
    """Raise ``ImportError`` unless the extension was built against the running torch: the C++
    ABI of another build (another version, or CPU vs CUDA) may differ, and a mismatch crashes or
    computes garbage instead of failing."""
    if built != running:
        raise ImportError(
            f"sparsekern._C was built against torch {built} but torch {running} is running; it is not used "
            "(rebuild it against this torch with `pip install --no-build-isolation -e .`)"
        )


def load_library() -> tuple[bool, str]:
    """Import ``sparsekern._C`` once; ``(ok, reason)``."""
    if "ok" not in _STATE:
        try:
            from .. import _C  # noqa: F401  (loading it registers torch.ops.sparsekern.*)

            missing = [n for n in OP_NAMES if not hasattr(torch.ops.sparsekern, n)]
            if missing:
                raise ImportError(f"sparsekern._C is loaded but lacks the ops {missing}; rebuild it")
            check_torch_version(torch.ops.sparsekern.built_with_torch(), torch.__version__)
            _register_fakes()
            _register_autograd()
            _STATE["ok"], _STATE["why"] = True, ""
        except Exception as exc:  # not built, or built against another torch
            _STATE["ok"] = False
            _STATE["why"] = (
                f"the C++ kernels (sparsekern._C) are not built or do not load ({exc}); build them with "
                "`pip install --no-build-isolation -e .` (needs a C++ compiler), or see setup.py"
            )
    return _STATE["ok"], _STATE["why"]


def _i32(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dtype == torch.int32:
        return t
    raise BackendError(f"{name}: the cpp kernels take int32 indices; this pattern needs {t.dtype} (too large)")


def _csr_args(pattern) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``(crow, col, block)`` of a pattern in its own layout."""
    if pattern.layout == "block":
        meta = pattern.bsr()
        return _i32(meta.crow_indices, "crow_indices"), _i32(meta.col_indices, "col_indices"), list(meta.block)
    meta = pattern.csr()
    return _i32(meta.crow_indices, "crow_indices"), _i32(meta.col_indices, "col_indices"), [1, 1]


def _csc_args(pattern) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``(ccol, row, block)``: the transposed metadata, for input gradients."""
    if pattern.layout == "block":
        meta = pattern.bsr()
        return _i32(meta.ccol_indices, "ccol_indices"), _i32(meta.row_indices, "row_indices"), list(meta.block)
    meta = pattern.csr()
    return _i32(meta.ccol_indices, "ccol_indices"), _i32(meta.row_indices, "row_indices"), [1, 1]


# Window-major metadata (``csr_windows``) for the L1 path of unstructured linear ops: columns cut
# into windows of this many, so one window of a 128-column float tile is 32 KiB (float64 tiles are
# half as wide, the same bytes).
WINDOW = 64
# When the window-major path runs, from op-by-op and whole-step measurements on a 2 MB-L2 core
# (2 threads; 768->3072 at batch 128 / 256 / 2048, 4096->4096 at batch 128 / 256): at batch 2048 and
# 90 % sparsity it beat the plain panels on every op (10-20 %; whole step 2.04-2.08x -> 2.39-2.49x
# over dense); at batch 128-256 it was level to 30 % slower (one or two tiles: packing the values in
# window order costs a pass the plain panels avoid, and each window reloads the accumulators); at
# 95-98 % it lost everywhere (one to three nonzeros per row and window).  Hence the gates below.
WINDOW_MIN_BATCH = 512
WINDOW_MIN_DENSITY = 1.0 / 16


def _windows_enabled() -> bool:
    """``SPARSEKERN_CPU_WINDOWS=0`` turns the window-major path off (for comparisons)."""
    return os.environ.get("SPARSEKERN_CPU_WINDOWS", "1") != "0"


def _windows(meta, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Window-major copy of ``meta`` (CSR, or its CSC when ``transposed``), derived once per mask
    version through the metadata's cache."""

    def build():
        rows, cols = meta.shape
        if transposed:
            ptr, idx, ncols = meta.ccol_indices, meta.row_indices, rows
        else:
            ptr, idx, ncols = meta.crow_indices, meta.col_indices, cols
        return torch.ops.sparsekern.csr_windows(_i32(ptr, "ptr"), _i32(idx, "idx"), ncols, WINDOW)

    return meta.derived(("cpp.windows", transposed, WINDOW), build)


def _window_args(pattern, batch: int, transposed: bool, dtype: torch.dtype = torch.float32) -> dict:
    if dtype == torch.bfloat16:  # bf16 runs the panels (the window kernels are float / double)
        return {}
    if pattern.layout != "unstructured" or batch < WINDOW_MIN_BATCH or not _windows_enabled():
        return {}
    meta = pattern.csr()
    if meta.density < WINDOW_MIN_DENSITY:
        return {}
    wptr, widx = _windows(meta, transposed)
    return {"win_ptr": wptr, "win_idx": widx, "window": WINDOW}


def _elem_csr(pattern) -> tuple[torch.Tensor, torch.Tensor]:
    meta = pattern.csr()
    return _i32(meta.crow_indices, "crow_indices"), _i32(meta.col_indices, "col_indices")


def _is_depthwise(weight_shape, groups: int) -> bool:
    return groups > 1 and weight_shape[1] == 1 and weight_shape[0] % groups == 0


class CppBackend(Backend):
    """C++ CPU kernels: float32 / float64 / bfloat16, unstructured and block layouts, linear and
    conv2d (groups=1 and depthwise).  bf16 accumulates in fp32 with one rounding on store: on
    CPUs with AVX512-BF16 linear (every layout, all three passes) and the direct conv2d run on
    vdpbf16ps over bf16 tiles; elsewhere, and for conv shapes on implicit GEMM, bf16 is widened
    to fp32 (linear in its tile loads, conv2d at the op boundary).  Under bf16 autocast linear
    reads the fp32 master weight itself (``mixed_bf16_weight``).  Results are bit-identical for
    any ``torch.get_num_threads()``."""

    name = "cpp"
    mixed_bf16_weight = True

    def available(self) -> tuple[bool, str]:
        return load_library()

    def supports(self, info: CallInfo) -> tuple[bool, str]:
        if info.device.type != "cpu":
            return False, f"runs on CPU tensors only, got {info.device.type}"
        if info.dtype not in _DTYPES:
            return False, f"supports float32, float64 and bfloat16, got {info.dtype}"
        if info.layout not in ("unstructured", "block") or info.grad_layout not in ("unstructured", "block"):
            return False, f"unknown layout {info.layout!r} / {info.grad_layout!r}"
        if info.op == "conv2d" and info.conv is not None and info.conv.groups != 1:
            if info.weight_shape is None:
                return False, "grouped conv without the weight shape: cannot tell whether it is depthwise"
            if not _is_depthwise(info.weight_shape, info.conv.groups):
                return False, (
                    f"conv2d supports groups=1 and depthwise (weight [C_out, 1, kh, kw]); got groups="
                    f"{info.conv.groups} with weight shape {tuple(info.weight_shape)}"
                )
        if info.op not in OPS:
            return False, f"unknown op {info.op!r}"
        return True, ""

    def prepare(self, info, pattern, grad_pattern, batch=None) -> None:
        if info.op == "conv2d" and info.conv is not None and info.conv.groups != 1:
            pattern.csr()  # depthwise kernels read the element CSR in every layout
            grad_pattern.csr()
            return
        super().prepare(info, pattern, grad_pattern, batch)
        if info.op == "linear" and batch is not None:
            _window_args(pattern, batch, False, info.dtype)
            _window_args(pattern, batch, True, info.dtype)
            _window_args(grad_pattern, batch, False, info.dtype)

    # ---- linear -------------------------------------------------------------------------------
    def linear_fwd(self, x, weight, bias, pattern):
        crow, col, block = _csr_args(pattern)
        win = _window_args(pattern, x.shape[0], False, x.dtype)
        return torch.ops.sparsekern.linear_fwd(x, weight, bias, crow, col, block, **win)

    def linear_dx(self, dy, weight, pattern):
        ccol, row, block = _csc_args(pattern)
        win = _window_args(pattern, dy.shape[0], True, dy.dtype)
        return torch.ops.sparsekern.linear_dx(dy, weight, ccol, row, block, **win)

    def linear_dw(self, dy, x, grad_pattern):
        crow, col, block = _csr_args(grad_pattern)
        win = _window_args(grad_pattern, dy.shape[0], False, dy.dtype)
        return torch.ops.sparsekern.linear_dw(dy, x, crow, col, block, **win)

    def linear_dw_values(self, dy, x, grad_pattern):
        if not hasattr(torch.ops.sparsekern, "linear_dw_values"):  # an extension built before the op
            return super().linear_dw_values(dy, x, grad_pattern)
        crow, col, block = _csr_args(grad_pattern)
        win = _window_args(grad_pattern, dy.shape[0], False, dy.dtype)
        return torch.ops.sparsekern.linear_dw_values(dy, x, crow, col, block, **win)

    # ---- conv2d -------------------------------------------------------------------------------
    @staticmethod
    def _conv_args(conv):
        return list(conv.stride), list(conv.padding), list(conv.dilation)

    # The conv kernels compute on zero-padded buffers: the direct algorithm multiplies a zero dy
    # outside y by W (dx) and by x (dW), the depthwise kernels skip the padding taps of x.  With
    # finite values that changes nothing; with a NaN / Inf it would break the reference's
    # semantics (sparsekern.reference), so those calls run the reference's exact definition.
    # The checks read W (fwd, dx) and dW (dW), never the activations, except dy of a depthwise
    # dW; a kernel's spurious terms are 0 * Inf = NaN, so a NaN-free dW needs no second look.
    @staticmethod
    def _weight_nonfinite(weight, pattern) -> bool:
        return not reference._all_finite(weight) and not reference._all_finite(weight[pattern.mask])

    def conv2d_fwd(self, x, weight, bias, pattern, conv):
        if self._weight_nonfinite(weight, pattern):
            return reference.conv2d_fwd(x, weight, bias, pattern.mask, conv)
        s, p, d = self._conv_args(conv)
        if conv.groups != 1:
            self._need_depthwise(weight.shape, conv.groups)
            crow, col = _elem_csr(pattern)
            return torch.ops.sparsekern.dwconv2d_fwd(x, weight, bias, crow, col, s, p, d)
        crow, col, block = _csr_args(pattern)
        return torch.ops.sparsekern.conv2d_fwd(x, weight, bias, crow, col, block, s, p, d)

    def conv2d_dx(self, dy, weight, pattern, input_shape, conv):
        if self._weight_nonfinite(weight, pattern):
            return reference.conv2d_dx(dy, weight, pattern.mask, tuple(input_shape), conv)
        s, p, d = self._conv_args(conv)
        if conv.groups != 1:
            self._need_depthwise(weight.shape, conv.groups)
            crow, col = _elem_csr(pattern)
            return torch.ops.sparsekern.dwconv2d_dx(dy, weight, crow, col, list(input_shape), s, p, d)
        ccol, row, block = _csc_args(pattern)
        return torch.ops.sparsekern.conv2d_dx(dy, weight, ccol, row, block, list(input_shape), s, p, d)

    def conv2d_dw(self, dy, x, grad_pattern, weight_shape, conv):
        s, p, d = self._conv_args(conv)
        if conv.groups != 1:
            self._need_depthwise(weight_shape, conv.groups)
            if not reference._all_finite(dy):
                return reference.conv2d_dw(dy, x, grad_pattern.mask, tuple(weight_shape), conv)
            crow, col = _elem_csr(grad_pattern)
            return torch.ops.sparsekern.dwconv2d_dw(dy, x, crow, col, list(weight_shape), s, p, d)
        crow, col, block = _csr_args(grad_pattern)
        dw = torch.ops.sparsekern.conv2d_dw(dy, x, crow, col, block, list(weight_shape), s, p, d)
        if bool(torch.isnan(dw.sum())):  # a NaN term makes the sum NaN (an Inf pair too: then exact)
            return reference.conv2d_dw(dy, x, grad_pattern.mask, tuple(weight_shape), conv)
        return dw

    def conv2d_dw_values(self, dy, x, grad_pattern, weight_shape, conv):
        if conv.groups != 1 or not hasattr(torch.ops.sparsekern, "conv2d_dw_values"):
            return super().conv2d_dw_values(dy, x, grad_pattern, weight_shape, conv)
        s, p, d = self._conv_args(conv)
        crow, col, block = _csr_args(grad_pattern)
        vals = torch.ops.sparsekern.conv2d_dw_values(dy, x, crow, col, block, list(weight_shape), s, p, d)
        if bool(torch.isnan(vals.sum())):  # as conv2d_dw: the reference's term-by-term semantics
            return super().conv2d_dw_values(dy, x, grad_pattern, weight_shape, conv)
        return vals

    @staticmethod
    def _need_depthwise(weight_shape, groups: int) -> None:
        if not _is_depthwise(tuple(weight_shape), groups):
            raise BackendError(
                f"cpp conv2d supports groups=1 and depthwise only; got groups={groups}, weight shape "
                f"{tuple(weight_shape)}"
            )


def cpu_isa(request: str = "") -> str:
    """The instruction set the kernels use; ``request`` ("avx512", "avx2", "generic") switches it."""
    ok, why = load_library()
    if not ok:
        raise BackendError(why)
    return torch.ops.sparsekern.cpu_isa(request)


def cpu_bf16(request: str = "") -> str:
    """The path bf16 kernels take: ``"avx512_bf16"`` (block panels on vdpbf16ps; bf16 subnormal
    inputs count as zero there) or ``"widen"`` (bf16 widened to float, float FMAs).  ``request``
    switches it; ``SPARSEKERN_CPU_BF16=avx512_bf16|widen`` sets the first choice (an unsupported
    value leaves the best path).  :func:`cpu_features` says what the CPU offers."""
    ok, why = load_library()
    if not ok:
        raise BackendError(why)
    return torch.ops.sparsekern.cpu_bf16(request)


def cpu_features() -> str:
    """The CPU's bf16 features the kernels detected, comma-separated (``"avx512_bf16,amx_bf16"``;
    ``amx_bf16`` only once Linux has granted the tile state); ``""`` when it has none."""
    ok, why = load_library()
    if not ok:
        raise BackendError(why)
    return torch.ops.sparsekern.cpu_features()


def conv2d_algo(
    op: str, input_shape, weight_shape, stride=1, padding=0, dilation=1, pattern=None, dtype=torch.float32
) -> str:
    """The algorithm the cpp ``conv2d`` op ``op`` ("fwd", "dx" or "dw") runs for these shapes:
    ``"direct"`` (sparse convolution on shifted views of the input) or ``"gemm"`` (implicit GEMM
    on im2col tiles).  ``input_shape`` is ``[N, C, H, W]``, ``weight_shape`` ``[O, C, kh, kw]``
    (groups=1); ``stride`` / ``padding`` / ``dilation`` are ints or pairs; ``pattern`` (a
    :class:`~sparsekern.formats.Pattern`, default dense) gives the layout and the density.  The
    automatic choice is a fixed rule of the shapes (see ``auto_direct`` in ``csrc/cpu/conv2d.cpp``);
    ``dtype=torch.bfloat16`` reports it for bf16 operands (on the ``avx512_bf16`` path both
    algorithms have bf16 kernels and the rule differs: the direct kernels take 8x8 outputs of short
    im2col rows, the strided input gradient runs GEMM); ``SPARSEKERN_CPU_CONV_ALGO=direct|gemm`` forces one and is
    reported here too."""
    ok, why = load_library()
    if not ok:
        raise BackendError(why)

    def pair(v, name):
        if isinstance(v, int):
            return [v, v]
        v = list(v)
        if len(v) != 2:
            raise ValueError(f"{name}: expected an int or two ints, got {v}")
        return v

    input_shape, weight_shape = list(input_shape), list(weight_shape)
    if pattern is None:
        block, nnz = [1, 1], weight_shape[0] * weight_shape[1] * weight_shape[2] * weight_shape[3]
    else:
        block = list(pattern.bsr().block) if pattern.layout == "block" else [1, 1]
        nnz = int(pattern.mask.sum())
    return torch.ops.sparsekern.conv2d_algo(
        op,
        input_shape,
        weight_shape,
        pair(stride, "stride"),
        pair(padding, "padding"),
        pair(dilation, "dilation"),
        block,
        nnz,
        dtype == torch.bfloat16,
    )
