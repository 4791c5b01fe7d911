"""Mask initialisers: how many weights each layer keeps, and which.

*How many*: :func:`uniform_densities` (every layer at the same sparsity) or :func:`erk_densities`
(Erdős–Rényi–Kernel as in RigL, Evci et al. 2020: a layer's density is proportional to
``sum(shape) / prod(shape)``, scaled so the total matches, layers that would exceed density 1
kept dense).

*Which*: :func:`magnitude_mask` (largest ``|w|`` per layer), :func:`global_magnitude_masks`
(largest ``|w|`` over all layers at once), :func:`random_mask`.  Each takes ``layout="block"``
with a ``block_size`` in channel units; a tile of a conv weight covers ``bo`` output channels by
``bk`` input channels and every kernel tap, and tiles at the edges are padded.

Every function keeps exactly ``round(density * count)`` weights (or tiles), at least one when the
density is positive.  Ties at the threshold go to the first entries in row-major order of the
``[out, in/groups*kh*kw]`` view.

:func:`random_mask` and :func:`magnitude_mask` stream the scores in blocks of whole rows (about
2^18 entries each) through a radix select, so making a mask needs no float or int64 temporary
of the weight's size: only the boolean mask itself.  (Since this change a seed gives a different
random mask than before: the scores are drawn a row block at a time.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .formats import LAYOUTS, BlockSize, expand_block_mask

__all__ = [
    "check_sparsity",
    "random_mask",
    "magnitude_mask",
    "global_magnitude_masks",
    "uniform_densities",
    "erk_densities",
    "matrix_block",
]


def check_sparsity(sparsity, name: str = "sparsity") -> float:
    """Return ``sparsity`` as a float after checking it lies in ``[0, 1)``."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"{name}: expected a number in [0, 1), got {sparsity!r}")
    s = float(sparsity)
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise ValueError(f"{name}: expected a value in [0, 1), got {sparsity!r}")
    return s


def matrix_block(shape: Sequence[int], block_size) -> BlockSize:
    """Channel block ``b`` / ``(bo, bk)`` -> tile of the ``[out, in*kh*kw]`` matrix view."""
    return BlockSize.of(block_size, shape)


def _check_layout(layout, block_size):
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if layout == "block" and block_size is None:
        raise ValueError("block_size: required when layout='block'")


# Scores are streamed in blocks of whole matrix rows of about this many entries, so making a mask
# needs no score, index or padding tensor of the weight's size (only the boolean mask itself).
_CHUNK = 1 << 18


def _row_step(cols: int, multiple: int = 1) -> int:
    """Rows per streamed block: a multiple of ``multiple`` holding about ``_CHUNK`` entries."""
    return max(1, _CHUNK // max(1, cols * multiple)) * multiple


def _tensor_rows(mat: torch.Tensor, transform=None):
    """A score stream over the rows of ``mat``: ``stream(step)`` yields its row blocks in order."""

    def stream(step: int):
        for r0 in range(0, mat.shape[0], step):
            rows = mat[r0 : r0 + step]
            yield rows if transform is None else transform(rows)

    return stream


def _random_rows(rows: int, cols: int, generator: torch.Generator):
    """A stream of uniform scores: the same numbers on every pass (the generator's state is
    rewound to where the first pass began; it ends as one pass leaves it)."""
    start = generator.get_state()

    def stream(step: int):
        generator.set_state(start)
        for r0 in range(0, rows, step):
            yield torch.rand(min(step, rows - r0), cols, generator=generator, device=generator.device)

    return stream


def _sort_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered as the float32 values of ``x`` (NaN above +inf, as ``topk`` ranks it)."""
    bits = x.float().contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _count_from_top(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the ``k``-th largest entry of a histogram, and how many lie above that bin."""
    cum = hist.flip(0).cumsum(0)
    i = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype, device=cum.device)))
    above = int(cum[i - 1]) if i else 0
    return hist.numel() - 1 - i, above


def _select_top(stream, shape: tuple[int, int], k: int, step: int, device) -> torch.Tensor:
    """Boolean ``shape`` mask of the ``k`` largest scores of ``stream`` (ties at the threshold go to
    the first in row-major order): a radix select on the scores' 32-bit keys, 16 bits per pass,
    then a pass that writes the mask, each over chunks of ``step`` rows."""
    hist = torch.zeros(65536, dtype=torch.int64, device=device)
    for chunk in stream(step):
        hist.add_(torch.bincount(((_sort_keys(chunk) >> 16) + 32768).reshape(-1), minlength=65536))
    hi, above = _count_from_top(hist, k)
    hist.zero_()
    for chunk in stream(step):
        key = _sort_keys(chunk).reshape(-1)
        hist.add_(torch.bincount(key[(key >> 16) + 32768 == hi] & 0xFFFF, minlength=65536))
    lo, more = _count_from_top(hist, k - above)
    threshold = ((hi - 32768) << 16) | lo
    ties = k - above - more  # entries equal to the threshold that are kept, the first in order
    out = torch.empty(shape, dtype=torch.bool, device=device)
    r0 = 0
    for chunk in stream(step):
        key = _sort_keys(chunk)
        keep = out[r0 : r0 + key.shape[0]]
        torch.gt(key, threshold, out=keep)
        if ties:
            eq = (key == threshold).reshape(-1)
            n_eq = int(eq.sum())
            if n_eq:
                if n_eq > ties:  # only the first `ties` of this chunk's equal entries
                    eq &= eq.cumsum(0) <= ties
                keep.view(-1).logical_or_(eq)
                ties -= min(n_eq, ties)
        r0 += key.shape[0]
    return out


def _keep_count(density: float, n: int) -> int:
    k = int(round(density * n))
    if density > 0 and k == 0 and n:  # a layer asked to keep something keeps at least one weight/tile
        k = 1
    return k


def _keep_top(stream, shape: tuple[int, int], density: float, device) -> torch.Tensor:
    """Keep the top ``density`` fraction of the ``shape`` scores of ``stream`` (exactly
    :func:`_keep_count` of them)."""
    k = _keep_count(density, shape[0] * shape[1])
    step = _row_step(shape[1])
    if torch.device(device).type == "meta":  # shapes only (a layer built on the meta device)
        return torch.empty(shape, dtype=torch.bool, device=device)
    if 0 < k < shape[0] * shape[1]:
        return _select_top(stream, shape, k, step, device)
    return torch.full(shape, k > 0, dtype=torch.bool, device=device)


def _tile_scores_of(stream, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Mean of the ``shape`` scores of ``stream`` over each ``block`` tile (padding excluded), one
    group of tile rows at a time."""
    rows, cols = shape
    bo, bk = block
    cb = math.ceil(cols / bk)
    sums = []
    for chunk in stream(_row_step(cb * bk, bo)):
        h = chunk.shape[0]
        hb = math.ceil(h / bo)
        padded = chunk.new_zeros(hb * bo, cb * bk)
        padded[:h, :cols] = chunk
        sums.append(padded.view(hb, bo, cb, bk).sum(dim=(1, 3)))
    rb = math.ceil(rows / bo)
    if not sums or not cb:  # no rows or no columns: an empty grid
        return torch.zeros(rb, cb)
    s = torch.cat(sums)
    tile_rows = torch.full((rb,), float(bo), dtype=s.dtype, device=s.device)
    tile_rows[-1] = rows - (rb - 1) * bo
    tile_cols = torch.full((cb,), float(bk), dtype=s.dtype, device=s.device)
    tile_cols[-1] = cols - (cb - 1) * bk
    return s / torch.outer(tile_rows, tile_cols)


def _tile_scores(score: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Mean of ``score`` (matrix) over each tile (padding excluded)."""
    return _tile_scores_of(_tensor_rows(score), tuple(score.shape), block)


def _mask_from_scores(stream, shape, density, layout, block_size, device) -> torch.Tensor:
    """Keep the top ``density`` fraction of the weight-shaped scores of ``stream`` (row blocks of
    the matrix view) as elements or tiles."""
    mat_shape = (shape[0], math.prod(shape[1:]))
    if layout == "unstructured":
        return _keep_top(stream, mat_shape, density, device).view(shape)
    block = matrix_block(shape, block_size)
    tiles = _tile_scores_of(stream, mat_shape, block)
    keep = _keep_top(_tensor_rows(tiles), tuple(tiles.shape), density, device)
    return expand_block_mask(keep, block, mat_shape).view(shape)


def random_mask(
    shape: Sequence[int],
    sparsity: float,
    *,
    layout: str = "unstructured",
    block_size=None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean mask of ``shape`` keeping a uniformly random ``1 - sparsity`` fraction."""
    s = check_sparsity(sparsity)
    _check_layout(layout, block_size)
    gen = generator if generator is not None else torch.default_generator
    shape = tuple(shape)
    stream = _random_rows(shape[0], math.prod(shape[1:]), gen)
    return _mask_from_scores(stream, shape, 1.0 - s, layout, block_size, gen.device).to(device or gen.device)


def magnitude_mask(
    weight: torch.Tensor, sparsity: float, *, layout: str = "unstructured", block_size=None
) -> torch.Tensor:
    """Keep the ``1 - sparsity`` fraction of ``weight`` with the largest ``|w|`` (tile mean for blocks)."""
    s = check_sparsity(sparsity)
    _check_layout(layout, block_size)
    w = weight.detach()
    stream = _tensor_rows(w.reshape(w.shape[0], math.prod(w.shape[1:])), torch.abs)
    return _mask_from_scores(stream, tuple(w.shape), 1.0 - s, layout, block_size, w.device)


def global_magnitude_masks(
    weights: Sequence[torch.Tensor], sparsity: float, *, layout: str = "unstructured", block_size=None
) -> list[torch.Tensor]:
    """One threshold on ``|w|`` across all ``weights`` (tile means for blocks, weighted by tile size)."""
    s = check_sparsity(sparsity)
    _check_layout(layout, block_size)
    if not weights:
        return []
    scores, sizes = [], []
    for w in weights:
        mat = w.detach().abs().reshape(w.shape[0], -1).float()
        if layout == "block":
            block = matrix_block(tuple(w.shape), block_size)
            t = _tile_scores(mat, block)
            scores.append(t.reshape(-1))
            # each tile stands for the weights it covers, so the kept fraction counts weights
            sizes.append(torch.full_like(t.reshape(-1), float(block[0] * block[1])))
        else:
            scores.append(mat.reshape(-1))
            sizes.append(torch.ones_like(mat.reshape(-1)))
    dev = scores[0].device
    allscores = torch.cat([t.to(dev) for t in scores])
    allsizes = torch.cat([t.to(dev) for t in sizes])
    order = torch.argsort(allscores, descending=True, stable=True)
    budget = (1.0 - s) * allsizes.sum()
    cum = torch.cumsum(allsizes[order], 0)
    nkeep = int((cum <= budget + 1e-6).sum())
    keep = torch.zeros_like(allscores, dtype=torch.bool)
    keep[order[:nkeep]] = True
    out, off = [], 0
    for w, sc in zip(weights, scores):
        k = keep[off : off + sc.numel()]
        off += sc.numel()
        if layout == "block":
            block = matrix_block(tuple(w.shape), block_size)
            mat_shape = (w.shape[0], w.numel() // w.shape[0])
            rb, cb = math.ceil(mat_shape[0] / block[0]), math.ceil(mat_shape[1] / block[1])
            out.append(expand_block_mask(k.view(rb, cb), block, mat_shape).view(w.shape).to(w.device))
        else:
            out.append(k.view(w.shape).to(w.device))
    return out


def uniform_densities(shapes: Sequence[Sequence[int]], sparsity: float) -> list[float]:
    """Every layer at density ``1 - sparsity``."""
    s = check_sparsity(sparsity)
    return [1.0 - s for _ in shapes]


def erk_densities(shapes: Sequence[Sequence[int]], sparsity: float, *, power_scale: float = 1.0) -> list[float]:
    """Erdős–Rényi–Kernel densities whose weighted mean is ``1 - sparsity``.

    Layer ``l`` gets ``eps * (sum(shape_l) / prod(shape_l)) ** power_scale``, capped at 1; the
    capped layers are fixed dense and ``eps`` is solved again for the rest until none exceeds 1.
    """
    s = check_sparsity(sparsity)
    n = [math.prod(sh) for sh in shapes]
    raw = [(sum(sh) / math.prod(sh)) ** power_scale for sh in shapes]
    dense: set[int] = set()
    while True:
        budget = (1.0 - s) * sum(n) - sum(n[i] for i in dense)
        denom = sum(raw[i] * n[i] for i in range(len(shapes)) if i not in dense)
        eps = budget / denom if denom > 0 else 0.0
        over = [i for i in range(len(shapes)) if i not in dense and eps * raw[i] > 1.0]
        if not over:
            break
        dense.update(over)
    return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
