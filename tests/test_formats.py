"""Layouts: CSR/BSR metadata from masks, transposed metadata, caching, validation, torch.sparse."""

import pytest
import torch

from sparsekern import formats
from sparsekern.formats import Pattern, build_bsr, build_csr, pattern_of
from sparsekern.testing import MASK_KINDS, make_block_mask, make_mask

SHAPES = [(7, 5), (1, 1), (16, 16), (17, 33), (4, 3, 3, 3)]


def _dense_rows_cols(mask):
    m = formats.as_matrix(mask)
    r, c = m.nonzero(as_tuple=True)
    return m, r, c


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_csr_matches_mask(shape, kind):
    mask = make_mask(shape, kind, 0.4)
    meta = build_csr(mask)
    m, r, c = _dense_rows_cols(mask)
    assert meta.shape == tuple(m.shape)
    assert meta.nnz == int(m.sum())
    assert meta.crow_indices.dtype == torch.int32
    assert torch.equal(meta.to_mask(), m)
    # row pointers count each row's entries
    assert torch.equal((meta.crow_indices[1:] - meta.crow_indices[:-1]).long(), m.sum(1))
    assert torch.equal(meta.col_indices.long(), c)
    # transposed metadata: columns ascending, rows ascending inside a column
    assert torch.equal((meta.ccol_indices[1:] - meta.ccol_indices[:-1]).long(), m.sum(0))
    perm = meta.transpose_perm.long()
    assert torch.equal(meta.row_indices.long(), r[perm])
    t_cols = c[perm]
    assert bool((t_cols[1:] >= t_cols[:-1]).all()) if meta.nnz > 1 else True
    meta.validate()


def test_transpose_perm_maps_values():
    torch.manual_seed(1)
    w = torch.randn(9, 13)
    mask = make_mask(w.shape, "random", 0.3)
    meta = build_csr(mask)
    vals = w[mask]  # CSR order
    csc_vals = vals[meta.transpose_perm.long()]
    assert torch.equal(csc_vals, w.t()[mask.t()])


def test_validate_rejects_corrupt_metadata():
    mask = make_mask((6, 7), "random", 0.5)
    meta = build_csr(mask)
    bad = formats.CSRMeta(
        meta.shape,
        meta.crow_indices.flip(0).contiguous(),
        meta.col_indices,
        meta.ccol_indices,
        meta.row_indices,
        meta.transpose_perm,
        meta.nnz,
    )
    with pytest.raises(ValueError, match="crow_indices"):
        bad.validate()
    cols = meta.col_indices.clone()
    cols[0] = 99
    bad = formats.CSRMeta(
        meta.shape, meta.crow_indices, cols, meta.ccol_indices, meta.row_indices, meta.transpose_perm, meta.nnz
    )
    with pytest.raises(ValueError, match="col_indices"):
        bad.validate()
    perm = torch.zeros_like(meta.transpose_perm)
    bad = formats.CSRMeta(
        meta.shape, meta.crow_indices, meta.col_indices, meta.ccol_indices, meta.row_indices, perm, meta.nnz
    )
    with pytest.raises(ValueError, match="transpose_perm"):
        bad.validate()
    strided = torch.stack([meta.col_indices, meta.col_indices], 1)[:, 0]  # same values, not contiguous
    assert not strided.is_contiguous()
    bad = formats.CSRMeta(
        meta.shape, meta.crow_indices, strided, meta.ccol_indices, meta.row_indices, meta.transpose_perm, meta.nnz
    )
    with pytest.raises(ValueError, match="contiguous"):
        bad.validate()


@pytest.mark.parametrize("block", [(16, 16), (16, 32), (32, 16), (64, 64), (128, 128)])
@pytest.mark.parametrize("shape", [(16, 16), (17, 33), (65, 31), (1, 200)], ids=lambda s: "x".join(map(str, s)))
def test_bsr_roundtrip_and_padding(shape, block):
    mask = make_block_mask(shape, block, 0.5)
    meta = build_bsr(mask, block)
    assert meta.padded_shape[0] % block[0] == 0 and meta.padded_shape[1] % block[1] == 0
    assert meta.padded_shape[0] >= shape[0] and meta.padded_shape[1] >= shape[1]
    assert torch.equal(meta.to_mask(), mask)
    meta.validate()
    # every stored block has at least one True entry of the unpadded mask
    for r, c in zip(meta.blocks.row_ids().tolist(), meta.col_indices.tolist()):
        tile = mask[r * block[0] : (r + 1) * block[0], c * block[1] : (c + 1) * block[1]]
        assert bool(tile.all())


def test_bsr_rejects_non_block_constant_mask():
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[0, 0] = True
    with pytest.raises(ValueError, match="constant on each"):
        build_bsr(mask, 16)


@pytest.mark.parametrize("bad", [15, 0, (16,), (16, 48), 16.0, True])
def test_block_size_validation(bad):
    with pytest.raises(ValueError, match="block"):
        build_bsr(torch.ones(32, 32, dtype=torch.bool), bad)


def test_mask_type_errors():
    with pytest.raises(TypeError, match="torch.bool"):
        build_csr(torch.ones(3, 3))
    with pytest.raises(ValueError, match="mask"):
        build_csr(torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="layout"):
        Pattern(torch.ones(3, 3, dtype=torch.bool), "diagonal")


def test_pattern_cache_rebuilds_only_on_change():
    mask = make_mask((8, 8), "random", 0.5)
    p1 = pattern_of(mask)
    c1 = p1.csr()
    assert pattern_of(mask) is p1 and p1.csr() is c1
    mask[0, 0] = not bool(mask[0, 0])  # in-place write bumps the version counter
    p2 = pattern_of(mask)
    assert p2 is not p1
    assert torch.equal(p2.csr().to_mask(), mask)
    # a different layout of the same mask is a different pattern
    bmask = make_block_mask((32, 32), (16, 16), 0.5)
    assert pattern_of(bmask, "block", 16) is not pattern_of(bmask)


def test_conv_block_pattern_spans_kernel_taps():
    mask = make_block_mask((32, 32, 3, 3), (16, 16), 0.5)
    pat = pattern_of(mask, "block", 16)
    assert pat.block_size == (16, 16 * 9)
    meta = pat.bsr()
    assert torch.equal(meta.to_mask(), mask.reshape(32, -1))
    assert meta.blocks.shape == (2, 2)


def test_int32_overflow_check_switches_dtype():
    assert formats._index_dtype(10, 2**31 - 1) == torch.int32
    assert formats._index_dtype(10, 2**31) == torch.int64


def test_torch_sparse_csr_roundtrip():
    w = torch.randn(6, 9)
    mask = make_mask(w.shape, "empty_rows", 0.5)
    sp = formats.to_torch_sparse_csr(w, mask)
    assert sp.layout == torch.sparse_csr
    assert torch.equal(sp.to_dense(), w.masked_fill(~mask, 0))
    dense, m2 = formats.from_torch_sparse(sp)
    assert torch.equal(m2, mask)
    assert torch.equal(dense, w.masked_fill(~mask, 0))


def test_torch_sparse_bsr_roundtrip():
    w = torch.randn(32, 48)
    mask = make_block_mask(w.shape, (16, 16), 0.5)
    sp = formats.to_torch_sparse_bsr(w, mask, 16)
    assert sp.layout == torch.sparse_bsr
    assert torch.equal(sp.to_dense(), w.masked_fill(~mask, 0))
    dense, m2 = formats.from_torch_sparse(sp)
    assert torch.equal(m2, mask)
    with pytest.raises(ValueError, match="multiple"):
        formats.to_torch_sparse_bsr(torch.randn(17, 32), torch.ones(17, 32, dtype=torch.bool), 16)


def test_from_torch_sparse_keeps_explicit_zeros_and_coo():
    crow = torch.tensor([0, 1, 2])
    col = torch.tensor([1, 0])
    sp = torch.sparse_csr_tensor(crow, col, torch.tensor([0.0, 2.0]), size=(2, 2))
    _, mask = formats.from_torch_sparse(sp)
    assert mask.tolist() == [[False, True], [True, False]]
    coo = torch.randn(3, 4).masked_fill(torch.rand(3, 4) < 0.5, 0).to_sparse()
    dense, mask = formats.from_torch_sparse(coo)
    assert torch.equal(mask, dense != 0)
    with pytest.raises(TypeError, match="layout"):
        formats.from_torch_sparse(torch.randn(2, 2))


def test_meta_cache_is_keyed_by_identity_and_version():
    mask = make_mask((6, 9), "random", 0.5)
    cache = formats.meta_cache(mask)
    assert formats.meta_cache(mask) is cache
    built = []
    assert cache.get(("x",), lambda: built.append(1) or "v") == "v"
    assert cache.get("x", lambda: built.append(2)) == "v" and built == [1]  # "x" is ("x",)
    g = make_mask((6, 9), "random", 0.5)
    first = cache.get("dep", lambda: object(), deps=(g,))
    assert cache.get("dep", lambda: object(), deps=(g,)) is first
    g[0, 0] = not bool(g[0, 0])  # a written dependency rebuilds the entry
    second = cache.get("dep", lambda: object(), deps=(g,))
    assert second is not first
    assert cache.get("dep", lambda: object(), deps=(g.clone(),)) is not second  # another tensor
    assert cache.peek("nothing") is None and ("x",) in cache.keys()
    mask[0, 0] = not bool(mask[0, 0])
    fresh = formats.meta_cache(mask)
    assert fresh is not cache and fresh.keys() == []
    other = mask.clone()
    assert formats.meta_cache(other) is not fresh  # same contents, another tensor
    # derived data never travels with a copy
    import copy
    import pickle

    assert copy.deepcopy(fresh).keys() == [] and pickle.loads(pickle.dumps(cache)).keys() == []


def test_pattern_and_metadata_derive_through_the_mask_cache():
    mask = make_block_mask((32, 48), (16, 16), 0.5)
    pat = pattern_of(mask, "block", 16)
    cache = formats.meta_cache(mask)
    assert pat.cache is cache
    bsr, csr = pat.bsr(), pat.csr()
    assert cache.peek(("bsr", (16, 16))) is bsr and cache.peek(("csr",)) is csr
    assert pattern_of(mask).csr() is csr  # the element CSR is shared by every layout of the mask
    assert bsr.blocks.derived("k", lambda: 1) == 1 and cache.peek(("bsr", (16, 16), "k")) == 1
    assert csr.derived("k", lambda: 2) == 2 and cache.peek(("csr", "k")) == 2
    # a pattern built directly keeps a cache of its own (a rebuild really rebuilds)
    own = Pattern(mask)
    assert own.cache is not cache and own.csr() is not csr
    # a pattern keeps the cache of the mask version it was built for
    mask[:16] = True
    assert pat.cache is cache and pattern_of(mask, "block", 16).cache is not cache
    with pytest.raises(ValueError, match="stale"):
        pat.validate()
    # standalone metadata derives into a cache of its own
    meta = build_csr(mask)
    assert meta.derived("k", lambda: object()) is meta.derived("k", lambda: object())


def test_block_size_is_one_unit():
    bs = formats.BlockSize.of((16, 32), (64, 32, 3, 3))  # channel units: 16 out x 32 in channels
    assert bs == (16, 288) and (bs.rows, bs.cols) == (16, 288) and str(bs) == "(16, 288)"
    assert bs.channels((64, 32, 3, 3)) == (16, 32)
    assert formats.BlockSize.of(32) == (32, 32) and formats.BlockSize.of(bs, (64, 32, 3, 3)) is bs
    with pytest.raises(ValueError, match="does not span whole input channels"):
        formats.BlockSize(16, 20).channels((32, 8, 3, 3))
    with pytest.raises(ValueError, match="block_size"):
        formats.BlockSize.of(12)
    mask = make_block_mask((32, 16, 3, 3), (16, 16), 0.5)
    pat = pattern_of(mask, "block", (16, 16))
    assert isinstance(pat.block_size, formats.BlockSize) and pat.block_size == (16, 144)
    assert pattern_of(mask, "block", formats.BlockSize(16, 144)) is pat  # a BlockSize is the matrix tile
    assert isinstance(pat.bsr().block, formats.BlockSize)
    assert isinstance(Pattern(mask, "block", (16, 144)).block_size, formats.BlockSize)
    with pytest.raises(ValueError, match="block_size: expected a BlockSize"):
        Pattern(mask, "block", 16)
