"""Mask generation (sparsekern/masks.py): exact counts, ties, blocks, streamed in chunks.

The scores stream through the radix select a few rows at a time; the tests shrink the chunk so
every case spans many chunks (and tile rows), and compare with ``torch.topk`` on tie-free scores.
"""

from __future__ import annotations

import math

import pytest
import torch

from sparsekern import masks
from sparsekern.formats import BlockSize

SHAPES = [(1, 1), (7, 5), (64, 33), (300, 70), (17, 3, 3, 3), (5, 0), (1, 500)]


@pytest.fixture(params=[64, 1 << 18], ids=["small_chunks", "default_chunks"])
def chunk(request, monkeypatch):
    monkeypatch.setattr(masks, "_CHUNK", request.param)
    return request.param


def _topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    flat = torch.zeros(score.numel(), dtype=torch.bool)
    if k:
        flat[torch.topk(score.reshape(-1), k).indices] = True
    return flat.view(score.shape)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_magnitude_mask_is_topk(shape, sparsity, chunk):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = masks.magnitude_mask(w, sparsity)
    k = masks._keep_count(1 - sparsity, w.numel())
    assert m.dtype == torch.bool and m.shape == w.shape and int(m.sum()) == k
    assert torch.equal(m, _topk_mask(w.abs().float(), k))


@pytest.mark.parametrize("sparsity", [0.3, 0.9])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_random_mask_exact_count_and_seeded(shape, sparsity, chunk):
    a = masks.random_mask(shape, sparsity, generator=torch.Generator().manual_seed(5))
    b = masks.random_mask(shape, sparsity, generator=torch.Generator().manual_seed(5))
    c = masks.random_mask(shape, sparsity, generator=torch.Generator().manual_seed(6))
    k = masks._keep_count(1 - sparsity, math.prod(shape))
    assert int(a.sum()) == k and torch.equal(a, b)
    if 1 < k < math.prod(shape) - 1:
        assert not torch.equal(a, c)


def test_random_mask_leaves_the_generator_as_one_draw(chunk):
    gen = torch.Generator().manual_seed(9)
    masks.random_mask((40, 30), 0.8, generator=gen)
    ref = torch.Generator().manual_seed(9)
    for r0 in range(0, 40, masks._row_step(30)):
        torch.rand(min(masks._row_step(30), 40 - r0), 30, generator=ref)
    assert torch.equal(gen.get_state(), ref.get_state())


def test_ties_go_to_the_first_entries(chunk):
    w = torch.ones(50, 50)
    w[49, 49] = 2.0
    m = masks.magnitude_mask(w, 0.9)
    assert int(m.sum()) == 250
    assert m[49, 49] and m.view(-1)[:249].all() and not m.view(-1)[249:-1].any()


def test_non_finite_scores_rank_as_topk_does(chunk):
    w = torch.randn(20, 20, generator=torch.Generator().manual_seed(1))
    w[3, 4], w[7, 1], w[0, 0] = float("inf"), float("nan"), -float("inf")
    m = masks.magnitude_mask(w, 0.95)  # keeps 20
    assert m[3, 4] and m[7, 1] and m[0, 0] and int(m.sum()) == 20


@pytest.mark.parametrize("block", [16, (16, 32)])
@pytest.mark.parametrize("shape", [(100, 70), (64, 32, 3, 3), (33, 17, 1, 1), (16, 16)], ids=str)
def test_block_masks_keep_top_tiles(shape, block, chunk):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    m = masks.magnitude_mask(w, 0.7, layout="block", block_size=block)
    bo, bk = BlockSize.of(block, shape)
    mat = w.abs().reshape(shape[0], -1)
    rows, cols = mat.shape
    rb, cb = math.ceil(rows / bo), math.ceil(cols / bk)
    padded = torch.zeros(rb * bo, cb * bk)
    padded[:rows, :cols] = mat
    ones = torch.zeros(rb * bo, cb * bk)
    ones[:rows, :cols] = 1
    means = padded.view(rb, bo, cb, bk).sum((1, 3)) / ones.view(rb, bo, cb, bk).sum((1, 3))
    keep = _topk_mask(means, masks._keep_count(1 - 0.7, rb * cb))
    want = keep.repeat_interleave(bo, 0).repeat_interleave(bk, 1)[:rows, :cols].reshape(shape)
    assert torch.equal(m, want)
    r = masks.random_mask(shape, 0.7, layout="block", block_size=block, generator=torch.Generator().manual_seed(3))
    tiles = torch.zeros(rb * bo, cb * bk, dtype=torch.bool)
    tiles[:rows, :cols] = r.reshape(rows, cols)
    per_tile = tiles.view(rb, bo, cb, bk).any(3).any(1)
    assert int(per_tile.sum()) == masks._keep_count(1 - 0.7, rb * cb)


def test_masks_on_the_meta_device():
    w = torch.empty(64, 32, device="meta")
    assert masks.magnitude_mask(w, 0.9).device.type == "meta"
    assert masks.magnitude_mask(w, 0.9, layout="block", block_size=16).shape == (64, 32)


@pytest.mark.parametrize("shape", [(0, 5), (0, 3, 3, 3), (4, 0, 3, 3)], ids=str)
def test_zero_size_weights(shape):
    assert masks.magnitude_mask(torch.randn(shape), 0.5).shape == shape
    assert masks.random_mask(shape, 0.5).shape == shape
    assert masks.magnitude_mask(torch.randn(shape), 0.5, layout="block", block_size=16).shape == shape
