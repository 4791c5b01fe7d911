"""Input generators, case lists and tolerances shared by the tests and the benchmarks.

``MASK_KINDS`` names the mask patterns every kernel is checked on; :func:`make_mask` builds them.
:func:`linear_cases` / :func:`conv_cases` are the explicit case lists every backend is checked on
(each case has a readable :attr:`~LinearCase.id`); :func:`linear_inputs` / :func:`conv_inputs`
build a case's tensors, and :func:`assert_matches` compares a result with the float64 reference
(for fp16 / bf16 by the rule in its docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._backends import ConvParams
from .formats import expand_block_mask

__all__ = [
    "MASK_KINDS",
    "TOLERANCES",
    "tolerance",
    "make_mask",
    "make_block_mask",
    "LinearCase",
    "ConvCase",
    "linear_cases",
    "conv_cases",
    "spmm_cases",
    "linear_inputs",
    "conv_inputs",
    "grad_mask_for",
    "Inputs",
    "assert_close",
    "assert_matches",
]

MASK_KINDS = ("random", "dense", "empty", "single", "empty_rows", "empty_cols", "skewed")

# (atol, rtol) per dtype for a kernel against the float reference computed in the same dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (5e-2, 2e-2),
    torch.float16: (1e-2, 1e-2),
}


def tolerance(dtype: torch.dtype) -> dict:
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def make_mask(shape, kind: str = "random", density: float = 0.3, *, generator=None, device="cpu") -> torch.Tensor:
    """A boolean mask of ``shape`` (2-D or 4-D) of one of :data:`MASK_KINDS`.

    ``empty_rows`` / ``empty_cols`` zero every other output row / matrix column of a random mask;
    ``skewed`` gives rows of very different length (in shuffled order): the ``i``-th shortest
    keeps about ``i / (rows - 1)`` of its entries, so one row is empty and one full.
    """
    shape = tuple(shape)
    rows, cols = shape[0], math.prod(shape[1:])
    if kind == "dense":
        m = torch.ones(rows, cols, dtype=torch.bool)
    elif kind == "empty":
        m = torch.zeros(rows, cols, dtype=torch.bool)
    elif kind == "single":
        m = torch.zeros(rows, cols, dtype=torch.bool)
        r = int(torch.randint(0, rows, (1,), generator=generator))
        c = int(torch.randint(0, cols, (1,), generator=generator))
        m[r, c] = True
    elif kind in ("random", "empty_rows", "empty_cols"):
        m = torch.rand(rows, cols, generator=generator) < density
        if kind == "empty_rows":
            m[::2] = False
        elif kind == "empty_cols":
            m[:, ::2] = False
    elif kind == "skewed":
        keep = torch.arange(rows, dtype=torch.float32)[:, None] / max(rows - 1, 1)
        m = (torch.rand(rows, cols, generator=generator) < keep)[torch.randperm(rows, generator=generator)]
    else:
        raise ValueError(f"kind: expected one of {MASK_KINDS}, got {kind!r}")
    return m.view(shape).to(device)


def make_block_mask(shape, block, density: float = 0.3, *, generator=None, device="cpu", empty_block_rows=False):
    """A block-constant mask; ``block`` is ``(bo, bk)`` in channel units (tiles span all conv taps)."""
    shape = tuple(shape)
    taps = shape[2] * shape[3] if len(shape) == 4 else 1
    bo, bk = block[0], block[1] * taps
    rows, cols = shape[0], math.prod(shape[1:])
    rb, cb = math.ceil(rows / bo), math.ceil(cols / bk)
    tiles = torch.rand(rb, cb, generator=generator) < density
    if empty_block_rows:
        tiles[::2] = False
    return expand_block_mask(tiles, (bo, bk), (rows, cols)).view(shape).to(device)


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------

#: where a case runs: "small" on every backend (the Triton interpreter included), "native" on
#: backends that run compiled code here (reference, cpp, and the GPU backends on a GPU), "gpu" on
#: the GPU backends only; "tiny" cases are for float64 gradcheck
SIZES = ("small", "native", "gpu", "tiny")
#: the sizes a conformance run (every case against the reference) covers
CONFORMANCE = ("small", "native", "gpu")
#: gradient masks a case's two passes use (the first with a bias, the second without):
#: "same" (G = M), "subset" (an unstructured subset of M), "blocks" (a block subset of M)
GRAD_KINDS = ("same", "subset", "blocks")


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _density_id(kind: str, density: float) -> str:
    return {"dense": "d1", "empty": "d0", "single": "nnz1"}.get(kind, f"d{density:g}")


def _layout_id(block) -> str:
    return "unstructured" if block is None else f"b{block[0]}x{block[1]}"


@dataclass(frozen=True)
class _Case:
    """What linear and conv cases share: the mask, the gradient masks, where the case runs."""

    kind: str = "random"  # a MASK_KINDS entry (unstructured), or "random" / "empty_block_rows" (block tiles)
    density: float = 0.3
    block: tuple[int, int] | None = None  # (bo, bk) in channel units: the block layout; None: unstructured
    grads: tuple[str, str] | None = None  # GRAD_KINDS of the two passes (default: see grad_kinds)
    x_layout: str = "contiguous"
    all_dtypes: bool = False  # checked in every dtype also where that is slow (see tests/support.py)
    size: str = "small"

    @property
    def layout(self) -> str:
        return "unstructured" if self.block is None else "block"

    @property
    def grad_kinds(self) -> tuple[str, str]:
        if self.grads is not None:
            return self.grads
        return ("subset", "same") if self.block is None else ("blocks", "subset")

    def weight_mask(self, shape, device="cpu") -> torch.Tensor:
        if self.block is None:
            return make_mask(shape, self.kind, self.density, device=device)
        return make_block_mask(
            shape, self.block, self.density, device=device, empty_block_rows=self.kind == "empty_block_rows"
        )

    def _suffix(self) -> str:
        parts = [_density_id(self.kind, self.density), _layout_id(self.block)]
        if self.kind not in ("random", "dense", "empty", "single"):
            parts.append(self.kind.replace("_", ""))
        if self.grads is not None:
            parts.append("G" + "+".join(self.grads))
        if self.x_layout != "contiguous":
            parts.append(f"x{self.x_layout}")
        return "-".join(parts)


@dataclass(frozen=True)
class LinearCase(_Case):
    """``y = x Wᵀ``: ``x [*batch, K]``, ``W [M, K]``.  ``x_layout``: "contiguous" or "transposed"
    (``x`` is a transposed view, so not contiguous)."""

    batch: tuple[int, ...] = (1,)
    in_features: int = 1
    out_features: int = 1

    @property
    def id(self) -> str:
        n = "x".join(str(b) for b in self.batch)
        return f"N{n}-K{self.in_features}-M{self.out_features}-{self._suffix()}"


@dataclass(frozen=True)
class ConvCase(_Case):
    """``y = conv2d(x, W)``: ``x [N, C, H, W]``, ``W [O, C / groups, kh, kw]``.  ``x_layout``:
    "contiguous", "channels_last", "strided" (a view taking every other pixel of a twice as large
    input) or "unbatched" (``x [C, H, W]``)."""

    batch: int = 1
    in_channels: int = 1
    out_channels: int = 1
    hw: tuple[int, int] = (1, 1)
    kernel: int | tuple[int, int] = 3
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    dilation: int | tuple[int, int] = 1
    groups: int = 1

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *_pair(self.kernel))

    @property
    def conv(self) -> ConvParams:
        return ConvParams(_pair(self.stride), _pair(self.padding), _pair(self.dilation), self.groups)

    @property
    def id(self) -> str:
        geo = "-".join(
            f"{k}{_pair(v)[0]}" if _pair(v)[0] == _pair(v)[1] else f"{k}{_pair(v)[0]}x{_pair(v)[1]}"
            for k, v in (("k", self.kernel), ("s", self.stride), ("p", self.padding), ("dil", self.dilation))
        )
        groups = f"-g{self.groups}" if self.groups != 1 else ""
        return (
            f"N{self.batch}-C{self.in_channels}-O{self.out_channels}-{self.hw[0]}x{self.hw[1]}-{geo}{groups}"
            f"-{self._suffix()}"
        )


def _lin(batch, k, m, **kw) -> LinearCase:
    return LinearCase(batch=batch if isinstance(batch, tuple) else (batch,), in_features=k, out_features=m, **kw)


def _conv(n, c, o, hw, kernel=3, stride=1, padding=0, dilation=1, groups=1, **kw) -> ConvCase:
    return ConvCase(
        batch=n,
        in_channels=c,
        out_channels=o,
        hw=hw,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        **kw,
    )


_LINEAR = [
    # unstructured: odd sizes, one off a block multiple (15/17, 31/33), batch 1 and 0, every mask kind
    _lin(1, 7, 5),
    _lin(3, 17, 15, all_dtypes=True),
    _lin(4, 33, 31, density=0.1),
    _lin(5, 16, 16, kind="dense", density=1.0),
    _lin(5, 16, 16, kind="empty", density=0.0),
    _lin(2, 9, 11, kind="single", all_dtypes=True),
    _lin(6, 20, 12, kind="empty_rows", all_dtypes=True),
    _lin(6, 20, 12, kind="empty_cols"),
    _lin(8, 64, 48, density=0.05),
    _lin(9, 45, 37, kind="skewed"),
    _lin(0, 4, 5),
    # non-contiguous and batched inputs
    _lin(6, 10, 12, density=0.4, x_layout="transposed"),
    _lin((2, 3, 4), 10, 12, density=0.4),
    _lin((3, 5), 40, 24, density=0.2, x_layout="transposed"),
    # block: sizes one off a multiple, empty block rows, density 0 and 1, rectangular and 64 tiles
    _lin(5, 47, 33, density=0.5, block=(16, 16), all_dtypes=True),
    _lin(1, 64, 80, kind="empty_block_rows", density=0.5, block=(16, 16)),
    _lin(3, 40, 70, density=0.5, block=(16, 32), all_dtypes=True),
    _lin(4, 96, 64, density=0.5, block=(16, 32)),
    _lin(4, 33, 31, density=1.0, block=(16, 32), grads=("same", "subset")),
    _lin(6, 33, 17, density=1.0, block=(16, 16)),
    _lin(3, 32, 32, density=0.0, block=(16, 16), grads=("same", "subset")),
    _lin(2, 32, 32, density=1.0, block=(32, 32)),
    _lin(2, 32, 32, density=0.0, block=(32, 32), grads=("same", "blocks")),
    _lin(20, 64, 48, kind="empty_block_rows", density=0.4, block=(16, 16)),
    _lin(20, 64, 48, density=0.5, block=(32, 32)),
    _lin(70, 65, 63, density=0.5, block=(32, 32)),
    _lin(7, 64, 48, kind="empty_block_rows", density=0.6, block=(32, 16), grads=("subset", "blocks"), all_dtypes=True),
    _lin(33, 90, 70, kind="empty_block_rows", density=0.4, block=(32, 16)),
    _lin(5, 130, 97, kind="empty_block_rows", density=0.6, block=(64, 64)),
    _lin((2, 3), 40, 24, density=0.5, block=(16, 16), x_layout="transposed"),
    # larger: several tiles in every direction, rows of very uneven length (row chunking)
    _lin(300, 200, 150, kind="skewed", size="native"),
    _lin(257, 130, 96, density=0.5, block=(16, 16), size="native"),
    # GPU sizes
    _lin(512, 768, 3072, density=0.1, size="gpu"),
    _lin(1024, 768, 3072, density=0.05, size="gpu"),
    _lin(257, 1000, 771, density=0.1, size="gpu"),
    _lin(300, 1001, 257, kind="empty_rows", density=0.2, size="gpu"),
    _lin(333, 511, 129, kind="empty_rows", density=0.3, size="gpu"),
    _lin(64, 256, 256, kind="empty_cols", density=0.3, size="gpu"),
    _lin(129, 200, 300, kind="dense", density=1.0, size="gpu"),
    _lin(64, 256, 256, kind="empty", density=0.0, size="gpu"),
    _lin(17, 33, 15, kind="single", size="gpu"),
    _lin(1000, 2048, 1500, kind="skewed", size="gpu"),
    _lin(1024, 768, 3072, density=0.1, block=(64, 64), size="gpu"),
    _lin(1024, 768, 3072, density=0.1, block=(128, 128), size="gpu"),
    _lin(513, 1000, 700, kind="empty_block_rows", density=0.3, block=(128, 64), grads=("subset", "blocks"), size="gpu"),
    _lin(256, 512, 512, density=1.0, block=(32, 32), grads=("same", "subset"), size="gpu"),
    _lin(257, 1000, 771, density=0.3, block=(64, 64), size="gpu"),
    _lin(333, 511, 129, kind="empty_block_rows", density=0.5, block=(16, 64), size="gpu"),
    _lin(64, 256, 256, density=0.0, block=(32, 32), size="gpu"),
    _lin(129, 200, 300, density=1.0, block=(16, 16), size="gpu"),
    _lin(512, 1024, 1024, kind="empty_block_rows", density=0.1, block=(64, 32), size="gpu"),
    # gradcheck
    _lin(3, 7, 6, density=0.5, size="tiny"),
    _lin(3, 7, 6, kind="dense", density=1.0, size="tiny"),
    _lin(3, 7, 6, kind="single", size="tiny"),
    _lin(3, 7, 6, kind="empty_rows", density=0.5, size="tiny"),
    _lin(3, 18, 20, density=0.5, block=(16, 16), size="tiny"),
]

# spmm (both transposes) and sddmm: "batch" is the dense side's free size (sddmm: the inner size)
_SPMM = [
    _lin(4, 5, 6, kind="empty_cols", density=0.6),
    _lin(3, 17, 15),
    _lin(2, 9, 11, kind="single"),
    _lin(5, 16, 16, kind="dense", density=1.0),
    _lin(5, 16, 16, kind="empty", density=0.0),
    _lin(6, 20, 12, kind="empty_rows", all_dtypes=True),
    _lin(5, 47, 33, density=0.5, block=(16, 16)),
    _lin(3, 40, 70, density=0.5, block=(16, 32), all_dtypes=True),
    _lin(3, 32, 32, density=0.0, block=(16, 16)),
    _lin(4, 5, 6, density=0.5, size="tiny"),
    _lin(3, 18, 20, density=0.5, block=(16, 16), size="tiny"),
]

_CONV = [
    # unstructured: odd spatial sizes, stride 2, padding, dilation, 1x1, depthwise, every mask kind
    _conv(2, 3, 4, (7, 7), padding=1, all_dtypes=True),
    _conv(1, 5, 6, (9, 8), stride=2, padding=1),
    _conv(2, 4, 8, (8, 9), padding=2, dilation=2),
    _conv(2, 6, 6, (7, 7), padding=1, groups=6, density=0.6),
    _conv(3, 8, 5, (5, 6), kernel=1),
    _conv(2, 4, 4, (6, 6), stride=2, kind="dense", density=1.0),
    _conv(2, 4, 4, (6, 6), padding=1, kind="empty", density=0.0),
    _conv(1, 3, 5, (5, 5), padding=1, kind="single"),
    _conv(2, 4, 6, (6, 5), padding=1, kind="empty_rows"),
    _conv(2, 4, 6, (6, 5), padding=1, kind="empty_cols"),
    _conv(1, 17, 33, (9, 8), stride=2, padding=1, kind="empty_rows", density=0.4, size="native"),
    # rectangular kernels, stride / padding / dilation mixed per axis
    _conv(1, 3, 4, (7, 8), kernel=(3, 2), stride=(2, 1), padding=(0, 1), dilation=(1, 2), density=0.5),
    _conv(1, 6, 4, (9, 9), kernel=1, stride=2, density=0.4),
    _conv(2, 4, 4, (4, 5), padding=(3, 2), density=0.4),
    # planes large enough for several tiles spanning images
    _conv(3, 5, 7, (19, 17), padding=1, density=0.4, size="native"),
    _conv(2, 4, 6, (17, 20), kernel=(3, 2), stride=(2, 1), padding=(0, 2), dilation=(1, 2), density=0.4, size="native"),
    _conv(2, 3, 5, (15, 16), kernel=(5, 3), stride=(2, 3), padding=(2, 1), dilation=(2, 1), density=0.4, size="native"),
    # input layouts
    _conv(2, 3, 4, (5, 5), padding=1, density=0.5, x_layout="strided"),
    _conv(1, 3, 4, (5, 5), padding=1, density=0.5, x_layout="unbatched"),
    _conv(2, 4, 6, (6, 5), stride=2, padding=1, density=0.5, x_layout="channels_last"),
    _conv(2, 16, 16, (6, 5), stride=2, padding=1, density=1.0, block=(16, 16), x_layout="channels_last"),
    # block (tiles span every kernel tap): channels one off a multiple, empty block rows, density 0 and 1
    _conv(2, 20, 33, (7, 6), padding=1, density=0.5, block=(16, 16)),
    _conv(1, 33, 17, (9, 9), stride=2, padding=1, kind="empty_block_rows", density=0.5, block=(16, 16)),
    _conv(1, 17, 33, (9, 8), stride=2, padding=1, kind="empty_block_rows", density=0.6, block=(16, 16)),
    _conv(2, 16, 16, (8, 7), padding=2, dilation=2, kind="empty_block_rows", density=0.6, block=(16, 16)),
    _conv(2, 40, 64, (5, 5), padding=2, dilation=2, density=0.6, block=(32, 32)),
    _conv(2, 24, 20, (5, 5), kernel=1, kind="empty_block_rows", density=0.6, block=(16, 16)),
    _conv(3, 16, 16, (4, 4), kernel=1, density=1.0, block=(16, 16)),
    _conv(1, 16, 16, (6, 6), stride=2, kind="empty_block_rows", density=0.6, block=(16, 16)),
    _conv(1, 16, 16, (5, 6), padding=1, density=1.0, block=(16, 16), grads=("same", "subset")),
    _conv(1, 16, 16, (5, 6), padding=1, density=0.0, block=(16, 16), grads=("same", "subset")),
    _conv(1, 70, 65, (4, 5), stride=2, density=0.7, block=(64, 64)),
    _conv(1, 16, 32, (6, 6), padding=1, density=0.5, block=(16, 16), grads=("same", "blocks"), all_dtypes=True),
    # depthwise in block layout, channel multiplier 1 and 2
    _conv(2, 32, 32, (9, 7), stride=(2, 1), padding=1, dilation=(1, 2), groups=32, density=0.5, block=(16, 16)),
    _conv(2, 32, 64, (9, 7), stride=(2, 1), padding=1, dilation=(1, 2), groups=32, density=0.5, block=(16, 16)),
    # GPU sizes: the triton shapes at 4x the batch and plane
    _conv(8, 20, 18, (28, 24), padding=1, kind="empty_rows", density=0.4, size="gpu"),
    _conv(4, 17, 33, (36, 32), stride=2, padding=1, kind="empty_rows", density=0.4, size="gpu"),
    _conv(8, 16, 16, (32, 28), padding=2, dilation=2, kind="empty_rows", density=0.4, size="gpu"),
    _conv(8, 24, 20, (20, 20), kernel=1, kind="empty_rows", density=0.4, size="gpu"),
    _conv(4, 16, 16, (24, 24), stride=2, kind="empty_rows", density=0.4, size="gpu"),
    _conv(8, 20, 18, (28, 24), padding=1, kind="empty_block_rows", density=0.6, block=(16, 16), size="gpu"),
    _conv(4, 17, 33, (36, 32), stride=2, padding=1, kind="empty_block_rows", density=0.6, block=(16, 16), size="gpu"),
    _conv(8, 16, 16, (32, 28), padding=2, dilation=2, kind="empty_block_rows", density=0.6, block=(16, 16), size="gpu"),
    _conv(8, 24, 20, (20, 20), kernel=1, kind="empty_block_rows", density=0.6, block=(16, 16), size="gpu"),
    _conv(4, 16, 16, (24, 24), stride=2, kind="empty_block_rows", density=0.6, block=(16, 16), size="gpu"),
    _conv(4, 16, 16, (20, 24), padding=1, kind="dense", density=1.0, size="gpu"),
    _conv(4, 16, 16, (20, 24), padding=1, kind="empty", density=0.0, size="gpu"),
    _conv(4, 16, 16, (20, 24), padding=1, density=1.0, block=(16, 16), grads=("same", "subset"), size="gpu"),
    _conv(4, 16, 16, (20, 24), padding=1, density=0.0, block=(16, 16), grads=("same", "subset"), size="gpu"),
    # gradcheck: groups=1 with stride, padding, dilation; depthwise with channel multiplier 1 and 2
    _conv(1, 2, 4, (6, 5), padding=1, density=0.5, size="tiny"),
    _conv(1, 2, 4, (6, 5), stride=2, density=0.5, size="tiny"),
    _conv(1, 2, 4, (6, 5), stride=2, padding=1, density=0.5, size="tiny"),
    _conv(1, 2, 4, (7, 6), padding=2, dilation=2, density=0.5, size="tiny"),
    _conv(1, 4, 4, (6, 5), padding=1, groups=4, density=0.5, size="tiny"),
    _conv(1, 4, 8, (5, 6), stride=2, padding=1, groups=4, density=0.5, size="tiny"),
]


def _select(cases, size):
    sizes = (size,) if isinstance(size, str) else size
    return [c for c in cases if c.size in sizes]


def linear_cases(size: str | tuple[str, ...] = "small") -> list[LinearCase]:
    """The linear cases of ``size`` (one or several of :data:`SIZES`)."""
    return _select(_LINEAR, size)


def spmm_cases(size: str | tuple[str, ...] = "small") -> list[LinearCase]:
    """The spmm / sddmm cases of ``size`` (one or several of :data:`SIZES`)."""
    return _select(_SPMM, size)


def conv_cases(size: str | tuple[str, ...] = "small") -> list[ConvCase]:
    """The conv2d cases of ``size`` (one or several of :data:`SIZES`)."""
    return _select(_CONV, size)


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------


def grad_mask_for(kind: str, mask: torch.Tensor, block=None, keep: float = 0.6) -> torch.Tensor | None:
    """The gradient mask of one of :data:`GRAD_KINDS` inside ``mask`` (``None`` for "same")."""
    if kind == "same":
        return None
    if kind == "subset":
        return mask & (torch.rand(mask.shape) < keep).to(mask.device)
    if kind == "blocks":
        return mask & make_block_mask(mask.shape, block, keep, device=mask.device)
    raise ValueError(f"kind: expected one of {GRAD_KINDS}, got {kind!r}")


@dataclass
class Inputs:
    """A case's tensors: ``weight`` is NaN outside ``mask`` (a kernel that reads a pruned weight
    shows it); ``grad_masks`` are the gradient masks of the case's two passes."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    mask: torch.Tensor
    grad_masks: tuple[torch.Tensor | None, torch.Tensor | None]


def _finish(case: _Case, x, weight, dtype, device) -> Inputs:
    mask = case.weight_mask(weight.shape, device)
    grads = tuple(grad_mask_for(k, mask, case.block) for k in case.grad_kinds)
    bias = torch.randn(weight.shape[0], dtype=dtype, device=device)
    return Inputs(x, weight.masked_fill(~mask, float("nan")), bias, mask, grads)


def linear_inputs(case: LinearCase, dtype=torch.float32, device="cpu") -> Inputs:
    k, m = case.in_features, case.out_features
    if case.x_layout == "transposed":
        x = torch.randn(*case.batch[:-1], k, case.batch[-1], dtype=dtype, device=device).transpose(-1, -2)
    elif case.x_layout == "contiguous":
        x = torch.randn(*case.batch, k, dtype=dtype, device=device)
    else:
        raise ValueError(f"x_layout: expected 'contiguous' or 'transposed', got {case.x_layout!r}")
    return _finish(case, x, torch.randn(m, k, dtype=dtype, device=device), dtype, device)


def conv_inputs(case: ConvCase, dtype=torch.float32, device="cpu") -> Inputs:
    shape = (case.batch, case.in_channels, *case.hw)
    if case.x_layout == "strided":
        x = torch.randn(*shape[:2], 2 * shape[2], 2 * shape[3], dtype=dtype, device=device)[:, :, ::2, ::2]
    elif case.x_layout == "unbatched":
        x = torch.randn(*shape[1:], dtype=dtype, device=device)
    else:
        x = torch.randn(shape, dtype=dtype, device=device)
        if case.x_layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif case.x_layout != "contiguous":
            raise ValueError(f"x_layout: unknown {case.x_layout!r}")
    return _finish(case, x, torch.randn(case.weight_shape, dtype=dtype, device=device), dtype, device)


# ------------------------------------------------------------------------------------------------
# comparisons
# ------------------------------------------------------------------------------------------------


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype=None, msg: str = "") -> None:
    """``torch.testing.assert_close`` with the tolerance of ``dtype`` (default: ``expected``'s)."""
    torch.testing.assert_close(actual, expected, **tolerance(dtype or expected.dtype), msg=msg or None)


def assert_matches(
    actual: torch.Tensor, exact: torch.Tensor, own: torch.Tensor | None = None, *, what: str = ""
) -> None:
    """``actual`` against ``exact``, the float64 reference on the same inputs.

    fp32 / fp64: ``exact`` rounded to ``actual``'s dtype, with that dtype's tolerance.  fp16 /
    bf16 (flash-attention's rule): the error is at most twice ``own``'s -- PyTorch's own result in
    that dtype -- plus one unit in the last place of the largest value.  A NaN always fails (with
    NaN-poisoned pruned weights it means a pruned weight was read or an element not written).
    """
    assert not torch.isnan(actual).any(), f"{what}: NaN (an element not written, or a pruned weight read)"
    assert actual.shape == exact.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(exact.shape)}"
    if actual.dtype in (torch.float32, torch.float64):
        assert_close(actual, exact.to(actual.dtype), msg=f"{what} differs from the reference")
        return
    if own is None:
        raise ValueError("own: required for fp16 / bf16 (PyTorch's result in that dtype)")
    if actual.numel() == 0:
        return
    err = (actual.double() - exact).abs().max().item()
    own_err = (own.double() - exact).abs().max().item()
    floor = torch.finfo(actual.dtype).eps * max(1.0, exact.abs().max().item())
    assert err <= 2 * own_err + floor, f"{what}: error {err:.3g} > 2 x PyTorch's {own_err:.3g} + {floor:.3g}"
