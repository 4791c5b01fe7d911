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
    bad = formats.CSRMeta(meta.shape, meta.crow_indices.flip(0).contiguous(), meta.col_indices, meta.ccol_indices,
                          meta.row_indices, meta.transpose_perm, meta.nnz)
    with pytest.raises(ValueError, match="crow_indices"):
        bad.validate()
    cols = meta.col_indices.clone()
    cols[0] = 99
    bad = formats.CSRMeta(meta.shape, meta.crow_indices, cols, meta.ccol_indices, meta.row_indices,
                          meta.transpose_perm, meta.nnz)
    with pytest.raises(ValueError, match="col_indices"):
        bad.validate()
    perm = torch.zeros_like(meta.transpose_perm)
    bad = formats.CSRMeta(meta.shape, meta.crow_indices, meta.col_indices, meta.ccol_indices, meta.row_indices,
                          perm, meta.nnz)
    with pytest.raises(ValueError, match="transpose_perm"):
        bad.validate()
    strided = torch.stack([meta.col_indices, meta.col_indices], 1)[:, 0]  # same values, not contiguous
    assert not strided.is_contiguous()
    bad = formats.CSRMeta(meta.shape, meta.crow_indices, strided, meta.ccol_indices, meta.row_indices,
                          meta.transpose_perm, meta.nnz)
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
