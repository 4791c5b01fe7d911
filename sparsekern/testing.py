"""Input generators and tolerances shared by the tests and the benchmarks.

``MASK_KINDS`` names the mask patterns every kernel is checked on; :func:`make_mask` builds them;
:func:`linear_cases` / :func:`conv_cases` are the explicit case lists (with readable ids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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
    "assert_close",
]

MASK_KINDS = ("random", "dense", "empty", "single", "empty_rows", "empty_cols")

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

    ``empty_rows`` / ``empty_cols`` zero every other output row / matrix column of a random mask.
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


@dataclass(frozen=True)
class LinearCase:
    batch: int
    in_features: int
    out_features: int
    kind: str
    density: float = 0.3

    @property
    def id(self) -> str:
        return f"N{self.batch}-K{self.in_features}-M{self.out_features}-{self.kind}-d{self.density}"


@dataclass(frozen=True)
class ConvCase:
    batch: int
    in_channels: int
    out_channels: int
    hw: tuple[int, int]
    kernel: int
    stride: int
    padding: int
    dilation: int
    groups: int
    kind: str
    density: float = 0.3

    @property
    def id(self) -> str:
        return (
            f"N{self.batch}-C{self.in_channels}-O{self.out_channels}-{self.hw[0]}x{self.hw[1]}-k{self.kernel}"
            f"-s{self.stride}-p{self.padding}-d{self.dilation}-g{self.groups}-{self.kind}"
        )


def linear_cases() -> list[LinearCase]:
    """Odd sizes, block-size off-by-one (15/17, 33), batch 1, every mask kind."""
    cases = [
        LinearCase(1, 7, 5, "random"),
        LinearCase(3, 17, 15, "random"),
        LinearCase(4, 33, 31, "random", 0.1),
        LinearCase(5, 16, 16, "dense"),
        LinearCase(5, 16, 16, "empty"),
        LinearCase(2, 9, 11, "single"),
        LinearCase(6, 20, 12, "empty_rows"),
        LinearCase(6, 20, 12, "empty_cols"),
        LinearCase(8, 64, 48, "random", 0.05),
    ]
    return cases


def conv_cases() -> list[ConvCase]:
    """Odd spatial sizes, stride 2, padding, dilation, depthwise, 1x1, every mask kind."""
    return [
        ConvCase(2, 3, 4, (7, 7), 3, 1, 1, 1, 1, "random"),
        ConvCase(1, 5, 6, (9, 8), 3, 2, 1, 1, 1, "random"),
        ConvCase(2, 4, 8, (8, 9), 3, 1, 2, 2, 1, "random"),
        ConvCase(2, 6, 6, (7, 7), 3, 1, 1, 1, 6, "random", 0.6),
        ConvCase(3, 8, 5, (5, 6), 1, 1, 0, 1, 1, "random"),
        ConvCase(2, 4, 4, (6, 6), 3, 2, 0, 1, 1, "dense"),
        ConvCase(2, 4, 4, (6, 6), 3, 1, 1, 1, 1, "empty"),
        ConvCase(1, 3, 5, (5, 5), 3, 1, 1, 1, 1, "single"),
        ConvCase(2, 4, 6, (6, 5), 3, 1, 1, 1, 1, "empty_rows"),
        ConvCase(2, 4, 6, (6, 5), 3, 1, 1, 1, 1, "empty_cols"),
    ]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype=None, msg: str = "") -> None:
    """``torch.testing.assert_close`` with the tolerance of ``dtype`` (default: ``expected``'s)."""
    torch.testing.assert_close(actual, expected, **tolerance(dtype or expected.dtype), msg=msg or None)
