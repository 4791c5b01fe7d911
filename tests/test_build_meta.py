"""The C++ metadata builders and mask update (csrc/cpu/build_meta.cpp) against the PyTorch ones.

``formats._build_csr_torch`` / ``formats._tile_any_all_torch`` and the torch path of ``set_mask``
are the specification: the C++ results must be the same tensors (``torch.equal``, same dtypes).
With ``SPARSEKERN_STRICT=1`` (or ``CI=true``) these tests fail when ``sparsekern._C`` is not
built; elsewhere they skip with the reason.
"""

from __future__ import annotations

import pytest
import torch

import sparsekern as sk
from sparsekern import formats
from sparsekern.formats import expand_block_mask, pattern_of
from sparsekern.kernels import cpu as cppmod
from sparsekern.ops._common import grad_pattern, weight_pattern
from sparsekern.testing import MASK_KINDS, make_block_mask, make_mask

pytestmark = pytest.mark.usefixtures("need_cpp")  # tests/conftest.py


class _TorchOnly:
    """Context: formats and set_mask take their pure-PyTorch paths (as without the extension)."""

    def __enter__(self):
        formats._native(torch.empty(0))  # resolve once, then hide it
        self.saved = list(formats._NATIVE)
        formats._NATIVE[:] = [None]

    def __exit__(self, *exc):
        formats._NATIVE[:] = self.saved


def _csr_tensors(meta):
    return (meta.crow_indices, meta.col_indices, meta.ccol_indices, meta.row_indices, meta.transpose_perm)


def _assert_same_csr(got, want):
    assert got.shape == want.shape and got.nnz == want.nnz
    for name, g, w in zip(("crow", "col", "ccol", "row", "perm"), _csr_tensors(got), _csr_tensors(want)):
        assert g.dtype == w.dtype, name
        assert g.is_contiguous(), name
        assert torch.equal(g, w), name


def _graded_mask(rows, cols, gen):
    """Row r has density r / rows: rows on both sides of the sparse-row threshold (1/64)."""
    dens = torch.arange(rows, dtype=torch.float32).div(max(rows, 1)).unsqueeze(1)
    return torch.rand(rows, cols, generator=gen) < dens


# shapes: under 8 columns, tails after whole words, one and several 64-column bands, 1xN, Nx1, conv
SHAPES = [(1, 1), (7, 5), (3, 8), (5, 9), (1, 37), (37, 1), (1, 1000), (1000, 1), (17, 33), (64, 64),
          (129, 257), (6, 700), (8, 4, 3, 3), (16, 3, 5, 5), (4, 2, 1, 1), (32, 16, 3, 3)]  # fmt: skip


# the density matters for the random-based kinds only
KINDS = [
    (k, d)
    for k in MASK_KINDS
    for d in ((0.0, 0.01, 0.3, 1.0) if k in ("random", "empty_rows", "empty_cols") else (0.3,))
]


@pytest.mark.parametrize("kind,density", KINDS, ids=lambda v: str(v))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_csr_equals_torch_builder(shape, kind, density):
    gen = torch.Generator().manual_seed(hash((shape, kind, density)) % 2**31)
    mask = make_mask(shape, kind, density, generator=gen)
    assert formats._native(mask) is not None
    _assert_same_csr(formats.build_csr(mask), formats._build_csr_torch(mask))


@pytest.mark.parametrize("shape", [(300, 517), (64, 4096), (2, 130)], ids=lambda s: "x".join(map(str, s)))
def test_csr_rows_of_every_density(shape):
    mask = _graded_mask(*shape, torch.Generator().manual_seed(3))
    _assert_same_csr(formats.build_csr(mask), formats._build_csr_torch(mask))


def test_csr_empty_dimensions_and_views():
    for shape in [(0, 5), (4, 0), (0, 0)]:
        m = torch.zeros(shape, dtype=torch.bool)
        _assert_same_csr(formats.build_csr(m), formats._build_csr_torch(m))
    base = torch.rand(40, 30) < 0.4
    for view in (base.t(), base[::2, 3:], base[:, ::3]):  # not contiguous
        assert not view.is_contiguous()
        _assert_same_csr(formats.build_csr(view), formats._build_csr_torch(view))


def test_csr_independent_of_thread_count():
    mask = _graded_mask(257, 1031, torch.Generator().manual_seed(5))
    want = formats._build_csr_torch(mask)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            _assert_same_csr(formats.build_csr(mask), want)
    finally:
        torch.set_num_threads(threads)


def test_csr_int64_indices_on_request():
    mask = make_mask((23, 45), "random", 0.3)
    want = formats._build_csr_torch(mask)
    got = torch.ops.sparsekern.csr_from_mask(mask, torch.int64)
    for g, w in zip(got, _csr_tensors(want)):
        assert g.dtype == torch.int64 and torch.equal(g, w.long())
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.sparsekern.csr_from_mask(mask, torch.int16)


def test_index_dtype_rule():
    def never():
        raise AssertionError("nnz counted although rows * cols fits int32")

    rule = formats._csr_index_dtype
    assert rule(10, 10, never) == torch.int32
    assert rule(2**31 - 2, 1, never) == torch.int32  # rows + 1 = 2^31 - 1 still fits
    assert rule(2**31 - 1, 1, lambda: 0) == torch.int64  # rows + 1 overflows
    assert rule(1, 2**31 - 1, lambda: 0) == torch.int64  # cols + 1 overflows
    assert rule(2**16, 2**16, lambda: 5) == torch.int32  # a bound that overflows, few nonzeros
    assert rule(2**16, 2**16, lambda: 2**31 - 1) == torch.int32
    assert rule(2**16, 2**16, lambda: 2**31) == torch.int64
    # the torch builder follows the same rule
    assert formats._build_csr_torch(make_mask((9, 9), "random", 0.5)).crow_indices.dtype == torch.int32


# ------------------------------------------------------------------------------------------------
# block layout: the tile reduction
# ------------------------------------------------------------------------------------------------

TILES = [((17, 33), (4, 5)), ((16, 16), (16, 16)), ((40, 50), (16, 16)), ((3, 200), (1, 1)), ((7, 9), (32, 64)),
         ((1, 100), (1, 8)), ((100, 1), (16, 1))]  # fmt: skip


@pytest.mark.parametrize("shape,tile", TILES, ids=lambda v: "x".join(map(str, v)))
def test_tile_any_all_equals_torch(shape, tile):
    gen = torch.Generator().manual_seed(11)
    cases = [
        torch.rand(shape, generator=gen) < 0.3,
        torch.rand(shape, generator=gen) < 0.97,
        torch.zeros(shape, dtype=torch.bool),
        torch.ones(shape, dtype=torch.bool),
        make_block_mask(shape, tile, 0.5, generator=gen),  # constant tiles, cropped at the edges
    ]
    for m in cases:
        got = torch.ops.sparsekern.tile_any_all(m, *tile)
        want = formats._tile_any_all_torch(m, *tile)
        for g, w in zip(got, want):
            assert g.dtype == torch.bool and torch.equal(g, w)
        grid, constant = formats.block_grid(m, *tile)
        assert torch.equal(grid, want[0])
        assert constant == torch.equal(expand_block_mask(want[0], tile, shape), m)


@pytest.mark.parametrize("shape,block", [((40, 50), (16, 16)), ((16, 8, 3, 3), (16, 16)), ((33, 20, 3, 3), (16, 16))])
def test_block_patterns_equal_torch(shape, block):
    mask = make_block_mask(shape, block, 0.4, generator=torch.Generator().manual_seed(2))
    broken = mask.clone()
    broken.view(-1)[1] = not bool(broken.view(-1)[1])
    native = pattern_of(mask, "block", block).bsr()
    with pytest.raises(ValueError, match="not constant"):
        pattern_of(broken, "block", block)
    with _TorchOnly():
        ref = pattern_of(mask.clone(), "block", block).bsr()
        with pytest.raises(ValueError, match="not constant"):
            pattern_of(broken.clone(), "block", block)
        ref2 = formats.build_bsr(mask, block) if mask.dim() == 2 else None
    assert native.block == ref.block and native.shape == ref.shape
    _assert_same_csr(native.blocks, ref.blocks)
    if ref2 is not None:
        _assert_same_csr(formats.build_bsr(mask, block).blocks, ref2.blocks)


def test_opcheck_builders():
    m = make_mask((13, 17), "random", 0.3)
    torch.library.opcheck(torch.ops.sparsekern.csr_from_mask.default, (m, torch.int32))
    torch.library.opcheck(torch.ops.sparsekern.tile_any_all.default, (m, 4, 5))


# ------------------------------------------------------------------------------------------------
# set_mask / set_grad_mask: the one-pass update against the torch path
# ------------------------------------------------------------------------------------------------


def _layer(kind, dtype=torch.float32, layout="unstructured", block=None):
    torch.manual_seed(0)
    if kind == "linear":
        return sk.SparseLinear(70, 45, dtype=dtype, layout=layout, block_size=block, sparsity=0.5)
    return sk.SparseConv2d(16, 32, 3, padding=1, dtype=dtype, layout=layout, block_size=block, sparsity=0.5)


def _mask_like(layer, density, seed):
    gen = torch.Generator().manual_seed(seed)
    if layer.layout == "block":
        return make_block_mask(layer.weight.shape, layer.block_size, density, generator=gen)
    return make_mask(layer.weight.shape, "random", density, generator=gen)


def _state(layer):
    return tuple(
        t.detach().clone(memory_format=torch.contiguous_format)
        for t in (layer.weight, layer.weight_mask, layer.grad_mask)
    )


def _assert_same_state(a, b):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype
        # bitwise: +0 where pruned (masked_fill semantics, also for -0 and NaN), the rest untouched
        assert torch.equal(
            x.view(torch.uint8) if x.dtype != torch.bool else x, y.view(torch.uint8) if y.dtype != torch.bool else y
        )


def _updates(layer):
    """A sequence of mask updates covering regrowth, frozen weights and explicit gradient masks."""
    m1, m2 = _mask_like(layer, 0.4, 1), _mask_like(layer, 0.6, 2)
    frozen_g = m1 & _mask_like(layer, 0.5, 3)
    return [
        ("set_mask", (m1,), {}),
        ("set_mask", (m2,), {}),  # regrown connections are trainable
        ("set_grad_mask", (m2 & _mask_like(layer, 0.5, 4),), {}),  # freeze some
        ("set_mask", (m1,), {}),  # frozen ones kept stay frozen
        ("set_mask", (m1, frozen_g), {}),
        ("set_mask", (m2,), {"zero_pruned": False}),
        ("set_mask", (m2.float(),), {}),  # 0/1 masks
        ("set_mask", ("self",), {}),  # the layer's own mask tensor
        ("set_grad_mask", ("self",), {}),
    ]


def _apply(layer, name, args, kw):
    args = tuple(
        (layer.weight_mask if name == "set_mask" else layer.weight_mask.clone()) if a == "self" else a for a in args
    )
    getattr(layer, name)(*args, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,layout,block", [("linear", "unstructured", None), ("conv", "unstructured", None),
                                               ("linear", "block", 16), ("conv", "block", (16, 16))])  # fmt: skip
def test_mask_updates_equal_torch_path(kind, layout, block, dtype, monkeypatch):
    calls = []

    class Ops:  # counts the C++ updates, so a silent fallback cannot pass as the fast path
        def __getattr__(self, name):
            op = getattr(torch.ops.sparsekern, name)
            return lambda *a: calls.append(name) or op(*a)

    import sparsekern.nn._base as base

    monkeypatch.setattr(base, "_native", lambda t: Ops() if formats._native(t) is not None else None)
    fast, slow = _layer(kind, dtype, layout, block), _layer(kind, dtype, layout, block)
    with torch.no_grad():  # pruned weights that are -0 or NaN must end as +0, as masked_fill_ leaves them
        for layer in (fast, slow):
            flat = layer.weight.view(-1)
            flat[::7] = -0.0
            flat[3::11] = float("nan")
    for name, args, kw in _updates(fast):
        versions = (fast.weight._version, fast.weight_mask._version, fast.grad_mask._version)
        _apply(fast, name, args, kw)
        with _TorchOnly():
            _apply(slow, name, args, kw)
        _assert_same_state(_state(fast), _state(slow))
        assert calls and calls[-1] == "update_masks_"
        calls.clear()
        assert fast.grad_mask._version > versions[2]
        if name == "set_mask":
            assert fast.weight_mask._version > versions[1]
            assert (fast.weight._version > versions[0]) == kw.get("zero_pruned", True)


@pytest.mark.parametrize("torch_only", [False, True])
def test_subset_errors_leave_the_layer_unchanged(torch_only):
    layer = _layer("linear")
    m = _mask_like(layer, 0.3, 1)
    layer.set_mask(m)
    before = _state(layer)
    outside = ~m
    ctx = _TorchOnly() if torch_only else torch.no_grad()
    with ctx:
        with pytest.raises(ValueError, match="grad_mask: must be a subset of mask"):
            layer.set_mask(m, outside)
        with pytest.raises(ValueError, match="the gradient mask must be a subset of weight_mask"):
            layer.set_grad_mask(outside)
    _assert_same_state(_state(layer), before)


def test_noncontiguous_buffers_take_the_torch_path():
    conv = _layer("conv").to(memory_format=torch.channels_last)
    ref = _layer("conv").to(memory_format=torch.channels_last)
    assert not conv.weight_mask.is_contiguous() and not conv.weight.is_contiguous()
    m = _mask_like(conv, 0.3, 9)
    conv.set_mask(m)
    with _TorchOnly():
        ref.set_mask(m)
    _assert_same_state(_state(conv), _state(ref))


# ------------------------------------------------------------------------------------------------
# a module after set_mask computes what a freshly built one computes
# ------------------------------------------------------------------------------------------------


def _step(layer, x):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("backend", [None, "cpp", "reference"])
@pytest.mark.parametrize("kind,layout,block", [("linear", "unstructured", None), ("conv", "unstructured", None),
                                               ("linear", "block", 16), ("conv", "block", (16, 16))])  # fmt: skip
def test_set_mask_then_step_equals_fresh_module(kind, layout, block, backend):
    layer = _layer(kind, torch.float64, layout, block)
    layer.backend = backend
    x = torch.randn(6, 70, dtype=torch.float64) if kind == "linear" else torch.randn(2, 16, 6, 6, dtype=torch.float64)
    _step(layer, x)  # metadata of the first mask built and cached
    m = _mask_like(layer, 0.5, 21)
    for g in (None, m & _mask_like(layer, 0.5, 22)):
        layer.zero_grad()
        layer.set_mask(m, g)
        got = _step(layer, x)
        fresh = _layer(kind, torch.float64, layout, block)
        fresh.backend = backend
        fresh.load_state_dict(layer.state_dict())
        want = _step(fresh, x)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("layout,block", [("unstructured", None), ("block", 16)])
def test_seeded_patterns_match_what_the_forward_builds(layout, block):
    layer = _layer("linear", layout=layout, block=block)
    m = _mask_like(layer, 0.5, 5)
    layer.set_mask(m)
    cache = formats.meta_cache(layer.weight_mask)
    cached = cache.peek(("pattern", layout, formats.pattern_block(layer.weight_mask, layout, block)))
    assert cached is not None  # seeded, in the cache of the current mask version
    pat = weight_pattern(layer.weight_mask, layout, layer.block_size)
    assert pat is cached
    if layout == "block":  # the grid of set_mask's check, kept for bsr()
        assert torch.equal(
            pat.cache.peek(("block_grid", pat.block_size)), formats._tile_any_all_torch(pat.matrix, *pat.block_size)[0]
        )
    assert grad_pattern(pat, layer.grad_mask) is pat  # G == M: the weight pattern itself
    pat.validate()
    g = m & _mask_like(layer, 0.5, 6)
    layer.set_grad_mask(g)
    assert weight_pattern(layer.weight_mask, layout, layer.block_size) is pat  # M unchanged: kept
    gp = grad_pattern(pat, layer.grad_mask)
    assert gp is not pat and torch.equal(gp.mask, g) and gp.mask.data_ptr() != layer.grad_mask.data_ptr()
    with torch.no_grad():
        gl = g.reshape(g.shape[0], -1)
        constant = (
            torch.equal(
                expand_block_mask(formats._tile_any_all_torch(gl, *pat.block_size)[0], pat.block_size, gl.shape), gl
            )
            if layout == "block"
            else False
        )
    assert gp.layout == ("block" if constant else "unstructured")
    gp.validate()
    # a write to the buffer afterwards still invalidates the seeded pattern
    with torch.no_grad():
        layer.weight_mask.zero_()
    assert weight_pattern(layer.weight_mask, "unstructured", None) is not pat


def test_prepare_metadata_builds_what_the_step_reads():
    layer = sk.SparseLinear(128, 64, sparsity=0.8, backend="cpp")
    layer.set_mask(_mask_like(layer, 0.5, 8), _mask_like(layer, 0.5, 8) & _mask_like(layer, 0.5, 9))
    layer._prepare_metadata(batch=cppmod.WINDOW_MIN_BATCH)
    info, pat, gpat = layer._call_info()
    assert pat.cache.peek(("csr",)) is not None and gpat.cache.peek(("csr",)) is not None and gpat is not pat
    assert any(k[:2] == ("csr", "cpp.windows") for k in pat.cache.keys())  # the window-major copies too
    ref = sk.SparseLinear(128, 64, sparsity=0.8, backend="reference")
    ref.load_state_dict(layer.state_dict())
    ref._prepare_metadata(batch=4)  # nothing to build for the reference
    assert weight_pattern(ref.weight_mask, "unstructured", None).cache.peek(("csr",)) is None


# ------------------------------------------------------------------------------------------------
# csr_windows (the parallel builder) against a PyTorch statement of the window-major layout
# ------------------------------------------------------------------------------------------------


def _windows_torch(ptr, idx, ncols, window):
    """Window-major CSR by a stable sort of the entries on their window (rows then columns stay
    ascending inside each window), and the row pointers from counts per (window, row)."""
    rows = ptr.numel() - 1
    nw = max(1, -(-ncols // window))
    row_of = torch.repeat_interleave(torch.arange(rows), (ptr[1:] - ptr[:-1]).long())
    win = idx.long() // window
    counts = torch.bincount(win * (rows + 1) + row_of, minlength=nw * (rows + 1))
    wptr = torch.zeros(nw * (rows + 1), dtype=torch.int64)
    wptr[1:] = counts.cumsum(0)[:-1]
    return wptr.to(torch.int32), idx[torch.argsort(win, stable=True)]


@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (0, 9), (9, 0), (64, 130), (300, 257), (513, 64)], ids=str)
def test_csr_windows_equal_torch(shape, density):
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(shape, generator=gen) < density
    if shape[0] > 2:
        mask[1] = False  # an empty row
    meta = formats.build_csr(mask)
    for window in (1, 8, 64, 100):
        for ptr, idx, n in (
            (meta.crow_indices, meta.col_indices, shape[1]),
            (meta.ccol_indices, meta.row_indices, shape[0]),
        ):
            got = torch.ops.sparsekern.csr_windows(ptr, idx, n, window)
            want = _windows_torch(ptr, idx, n, window)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), window


def test_csr_windows_independent_of_thread_count():
    mask = torch.rand(700, 300, generator=torch.Generator().manual_seed(4)) < 0.2
    meta = formats.build_csr(mask)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(torch.ops.sparsekern.csr_windows(meta.crow_indices, meta.col_indices, 300, 64))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for o in outs[1:] for a, b in zip(o, outs[0]))
