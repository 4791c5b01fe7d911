"""Backend registry and dispatch.

Every backend implements the same trio of passes per op -- ``fwd`` (forward), ``dx`` (input
gradient), ``dw`` (weight gradient on the gradient mask) -- as the methods ``linear_fwd / linear_dx
/ linear_dw`` and ``conv2d_fwd / conv2d_dx / conv2d_dw``.  The lower-level ``spmm`` and ``sddmm``
run on the linear trio but are ops of their own in :class:`CallInfo` (see :data:`OPS`), so a
backend's verifier can refuse them separately.  Which backend runs a call is decided once, in the
forward, and the backward reuses it:

1. the ``backend=`` argument, then
2. the ``SPARSEKERN_BACKEND`` environment variable (read at call time), then
3. the automatic order for the tensors' device (:data:`AUTO_ORDER`).

An explicitly requested backend that cannot run the call raises :class:`BackendError` with the
reason.  The automatic order skips a backend that cannot run the call and logs the reason once
per (backend, reason).  ``SPARSEKERN_BACKEND=reference`` is the kill switch for bisecting a
numerical problem.

Backends live in their own modules and are imported on first use, so ``import sparsekern``
touches neither Triton nor the compiled extension nor CUDA.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass

import torch

from .formats import BlockSize, flat_index

__all__ = [
    "BACKEND_NAMES",
    "OPS",
    "LINEAR_OPS",
    "AUTO_ORDER",
    "Backend",
    "BackendError",
    "ConvParams",
    "CallInfo",
    "get_backend",
    "is_automatic",
    "register_backend",
    "select_backend",
    "backend_report",
]

logger = logging.getLogger("sparsekern")

BACKEND_NAMES = ("triton", "cuda", "cpp", "reference")
ENV_VAR = "SPARSEKERN_BACKEND"
#: ``backend="auto"`` is the same as ``backend=None``: the automatic order, then the per-call
#: choice between the sparse kernels and dense masked compute (:mod:`sparsekern.choice`)
AUTO = "auto"

#: the values of :attr:`CallInfo.op`: one per public functional op
OPS = ("linear", "conv2d", "spmm", "sddmm")
#: the ops a backend runs with its linear trio (``linear_fwd / linear_dx / linear_dw``)
LINEAR_OPS = ("linear", "spmm", "sddmm")

AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpp", "reference"),
}

_LOADERS: dict[str, str] = {
    "reference": "sparsekern.reference:ReferenceBackend",
    "cpp": "sparsekern.kernels.cpu:CppBackend",
    "triton": "sparsekern.kernels.triton:TritonBackend",
    "cuda": "sparsekern.kernels.cuda:CudaBackend",
}
_INSTANCES: dict[str, Backend] = {}
_LOGGED: set[tuple[str, str]] = set()


class BackendError(RuntimeError):
    """An explicitly requested backend cannot run a call (the message says why)."""


@dataclass(frozen=True)
class ConvParams:
    """Normalised conv2d hyper-parameters (padding already explicit and symmetric)."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1


@dataclass(frozen=True)
class CallInfo:
    """What a backend's verifier gets to decide whether it can run a call."""

    op: str  # one of OPS
    device: torch.device
    dtype: torch.dtype
    layout: str  # weight-mask layout
    block_size: BlockSize | None  # the weight mask's tile, in matrix units
    grad_layout: str
    conv: ConvParams | None = None
    weight_shape: tuple[int, ...] | None = None  # lets a verifier tell depthwise from other grouped convs


class Backend:
    """Interface of a backend.  Subclasses override the trio (``fwd``, ``dx``, ``dw``) of each op they support."""

    name: str = "?"
    #: whether conv kernels take channels-last (NHWC-strided) tensors as they are
    channels_last: bool = False
    #: whether linear_fwd / linear_dx take a float32 weight with bfloat16 data (under bf16
    #: autocast the master weight is then read as it is, each entry rounded to bf16, instead of
    #: cast whole to bf16 first)
    mixed_bf16_weight: bool = False

    def available(self) -> tuple[bool, str]:
        """Whether the backend can run at all here (built, importable); reason if not."""
        return True, ""

    def supports(self, info: CallInfo) -> tuple[bool, str]:
        """Whether the backend can run this particular call; reason if not."""
        return True, ""

    def prepare(self, info: CallInfo, pattern, grad_pattern, batch: int | None = None) -> None:
        """Build now the index metadata this backend's kernels will read for ``info``'s call
        (``batch``: rows of a linear call's input), which the first call after a mask change would
        otherwise build.  It is cached with the patterns."""
        for p in (pattern, grad_pattern):
            if p.layout == "block":
                p.bsr()
            else:
                p.csr()

    # linear: x [N, K], weight [M, K], dy [N, M]
    def linear_fwd(self, x, weight, bias, pattern):
        raise BackendError(f"backend {self.name!r} has no linear forward")

    def linear_dx(self, dy, weight, pattern):
        raise BackendError(f"backend {self.name!r} has no linear input gradient")

    def linear_dw(self, dy, x, grad_pattern):
        raise BackendError(f"backend {self.name!r} has no linear weight gradient")

    def linear_dw_values(self, dy, x, grad_pattern):
        """``dW`` on the gradient pattern only: ``[nnz]``, in row-major order of its positions
        (:func:`~sparsekern.formats.flat_index`).  Default: the dense ``dW``, gathered."""
        return self.linear_dw(dy, x, grad_pattern).reshape(-1).index_select(0, flat_index(grad_pattern))

    # conv2d: x [N, C, H, W], weight [O, C/groups, kh, kw]
    def conv2d_fwd(self, x, weight, bias, pattern, conv: ConvParams):
        raise BackendError(f"backend {self.name!r} has no conv2d forward")

    def conv2d_dx(self, dy, weight, pattern, input_shape, conv: ConvParams):
        raise BackendError(f"backend {self.name!r} has no conv2d input gradient")

    def conv2d_dw(self, dy, x, grad_pattern, weight_shape, conv: ConvParams):
        raise BackendError(f"backend {self.name!r} has no conv2d weight gradient")

    def conv2d_dw_values(self, dy, x, grad_pattern, weight_shape, conv: ConvParams):
        """As :meth:`linear_dw_values` for conv2d.  Default: the dense ``dW``, gathered."""
        dw = self.conv2d_dw(dy, x, grad_pattern, weight_shape, conv)
        return dw.reshape(-1).index_select(0, flat_index(grad_pattern))


def register_backend(name: str, backend: Backend) -> None:
    """Install (or replace) the instance used for ``name``; ``name`` must be a known slot."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"name: expected one of {BACKEND_NAMES}, got {name!r}")
    _INSTANCES[name] = backend


def get_backend(name: str) -> Backend:
    """The backend instance for ``name`` (imported on first use)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {name!r}")
    inst = _INSTANCES.get(name)
    if inst is None:
        module_name, cls_name = _LOADERS[name].split(":")
        module = importlib.import_module(module_name)
        inst = getattr(module, cls_name)()
        _INSTANCES[name] = inst
    return inst


def is_automatic(backend: str | None) -> bool:
    """Whether a call with this ``backend=`` argument is dispatched automatically (no argument, or
    ``"auto"``, and no ``SPARSEKERN_BACKEND``): then :mod:`sparsekern.choice` may run it dense."""
    return _requested(backend)[0] is None


def _requested(backend: str | None) -> tuple[str | None, str]:
    if backend == AUTO:
        backend = None
    if backend is not None:
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend: expected one of {BACKEND_NAMES}, {AUTO!r} or None, got {backend!r}")
        return backend, "backend="
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        if env not in BACKEND_NAMES:
            raise ValueError(f"{ENV_VAR}: expected one of {BACKEND_NAMES}, got {env!r}")
        return env, ENV_VAR
    return None, ""


def _check(name: str, info: CallInfo) -> tuple[bool, str]:
    try:
        b = get_backend(name)
    except Exception as exc:  # a backend module that fails to import is just unavailable
        return False, f"could not load: {exc}"
    ok, why = b.available()
    if not ok:
        return False, why
    return b.supports(info)


def select_backend(info: CallInfo, backend: str | None = None) -> Backend:
    """The backend that runs ``info``'s call (see the module docstring for the precedence)."""
    name, source = _requested(backend)
    if name is not None:
        ok, why = _check(name, info)
        if not ok:
            raise BackendError(
                f"backend {name!r} (from {source}) cannot run sparsekern.{info.op} on "
                f"{info.device.type}/{info.dtype} with layout {info.layout!r}: {why}"
            )
        return get_backend(name)
    order = AUTO_ORDER.get(info.device.type, ("reference",))
    for cand in order:
        ok, why = _check(cand, info)
        if ok:
            return get_backend(cand)
        key = (cand, why)
        if key not in _LOGGED:
            _LOGGED.add(key)
            logger.warning("sparsekern: skipping backend %r for %s on %s: %s", cand, info.op, info.device.type, why)
    raise BackendError(f"no backend can run sparsekern.{info.op} on {info.device.type}")  # pragma: no cover


def backend_report(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[dict]:
    """For each op and layout on ``device``: every backend's verdict and the one chosen."""
    rows = []
    dev = torch.device(device)
    for op in OPS:
        for layout, block in (("unstructured", None), ("block", BlockSize(32, 32))):
            info = CallInfo(op, dev, dtype, layout, block, layout, ConvParams() if op == "conv2d" else None)
            verdicts = {n: _check(n, info) for n in BACKEND_NAMES}
            order = AUTO_ORDER.get(dev.type, ("reference",))
            chosen = next((n for n in order if verdicts[n][0]), "none")
            rows.append({"op": op, "layout": layout, "device": device, "chosen": chosen, "verdicts": verdicts})
    return rows
