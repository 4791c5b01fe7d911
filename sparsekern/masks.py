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
density is positive.
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


def _tile_scores(score: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Mean of ``score`` (matrix) over each tile (padding excluded)."""
    rows, cols = score.shape
    bo, bk = block
    rb, cb = math.ceil(rows / bo), math.ceil(cols / bk)
    padded = score.new_zeros(rb * bo, cb * bk)
    padded[:rows, :cols] = score
    count = score.new_zeros(rb * bo, cb * bk)
    count[:rows, :cols] = 1
    s = padded.view(rb, bo, cb, bk).sum(dim=(1, 3))
    n = count.view(rb, bo, cb, bk).sum(dim=(1, 3))
    return s / n


def _keep_top(scores: torch.Tensor, density: float) -> torch.Tensor:
    k = int(round(density * scores.numel()))
    if density > 0 and k == 0 and scores.numel():  # a layer asked to keep something keeps at least one weight/tile
        k = 1
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.topk(scores.reshape(-1).float(), k, sorted=False).indices
        keep[idx] = True
    return keep.view_as(scores)


def _mask_from_scores(score: torch.Tensor, shape, density, layout, block_size) -> torch.Tensor:
    """Keep the top ``density`` fraction of ``score`` (weight-shaped) as elements or tiles."""
    mat = score.reshape(shape[0], math.prod(shape[1:]))
    if layout == "unstructured":
        return _keep_top(mat, density).view(shape)
    block = matrix_block(shape, block_size)
    tiles = _keep_top(_tile_scores(mat, block), density)
    return expand_block_mask(tiles, block, mat.shape).view(shape)


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
    gen_device = generator.device if generator is not None else "cpu"
    score = torch.rand(tuple(shape), generator=generator, device=gen_device)
    return _mask_from_scores(score, tuple(shape), 1.0 - s, layout, block_size).to(device or gen_device)


def magnitude_mask(
    weight: torch.Tensor, sparsity: float, *, layout: str = "unstructured", block_size=None
) -> torch.Tensor:
    """Keep the ``1 - sparsity`` fraction of ``weight`` with the largest ``|w|`` (tile mean for blocks)."""
    s = check_sparsity(sparsity)
    _check_layout(layout, block_size)
    return _mask_from_scores(weight.detach().abs(), tuple(weight.shape), 1.0 - s, layout, block_size)


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
