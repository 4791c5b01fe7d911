"""The window-major path of the ``cpp`` unstructured linear ops (``csr_windows`` metadata, the
``win_ptr`` / ``win_idx`` / ``window`` arguments of ``linear_fwd``, ``linear_dx`` and
``linear_dw``) against the reference, on small windows so every case spans several of them."""

from __future__ import annotations

import os

import pytest
import torch

import sparsekern
from sparsekern import reference as ref
from sparsekern.formats import pattern_of
from sparsekern.kernels import cpu as cppmod
from sparsekern.testing import assert_close, linear_cases, make_block_mask, make_mask

REQUIRE = os.environ.get("CI", "").lower() == "true" or os.environ.get("SPARSEKERN_REQUIRE_CPP", "") == "1"
OK, WHY = cppmod.load_library()
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(autouse=True)
def _need_cpp():
    if not OK:
        if REQUIRE:
            pytest.fail(f"sparsekern._C is required here (CI / SPARSEKERN_REQUIRE_CPP) but not usable: {WHY}")
        pytest.skip(f"C++ kernels not built: {WHY}")


def _windows(ptr, idx, ncols, window):
    return torch.ops.sparsekern.csr_windows(ptr, idx, ncols, window)


@pytest.mark.parametrize("window", [1, 3, 8, 64])
def test_csr_windows_partition_the_pattern(window):
    mask = make_mask((13, 37), "random", 0.3)
    mask[4] = False  # an empty row
    csr = pattern_of(mask).csr()
    wptr, widx = _windows(csr.crow_indices, csr.col_indices, 37, window)
    nw = -(-37 // window)
    assert wptr.dtype == torch.int32 and widx.dtype == torch.int32
    assert wptr.numel() == nw * 14 and widx.numel() == csr.nnz
    seen = torch.zeros_like(mask)
    p = wptr.view(nw, 14)
    for w in range(nw):
        for r in range(13):
            cols = widx[p[w, r] : p[w, r + 1]]
            assert bool(((cols >= w * window) & (cols < (w + 1) * window)).all())
            assert bool((cols[1:] > cols[:-1]).all())  # ascending within a row and window
            seen[r, cols.long()] = True
        assert int(p[w, 13]) == (int(p[w + 1, 0]) if w + 1 < nw else csr.nnz)
    assert torch.equal(seen, mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [2, 16])
@pytest.mark.parametrize("case", linear_cases(), ids=lambda c: c.id)
def test_windowed_linear_fwd_dx_dw_vs_reference(case, window, dtype):
    M, K, N = case.out_features, case.in_features, case.batch
    mask = make_mask((M, K), case.kind, case.density)
    w = torch.randn(M, K, dtype=dtype)
    wp = w.masked_fill(~mask, float("nan"))  # reading a pruned entry would show as NaN
    x = torch.randn(N, K, dtype=dtype)
    b = torch.randn(M, dtype=dtype)
    csr = pattern_of(mask).csr()
    fw = _windows(csr.crow_indices, csr.col_indices, K, window)
    y = torch.ops.sparsekern.linear_fwd(x, wp, b, csr.crow_indices, csr.col_indices, [1, 1], *fw, window)
    assert_close(y, ref.linear_fwd(x, w, b, mask), dtype=dtype)
    dy = torch.randn(N, M, dtype=dtype)
    tw = _windows(csr.ccol_indices, csr.row_indices, M, window)
    dx = torch.ops.sparsekern.linear_dx(dy, wp, csr.ccol_indices, csr.row_indices, [1, 1], *tw, window)
    assert_close(dx, ref.linear_dx(dy, w, mask), dtype=dtype)
    dw = torch.ops.sparsekern.linear_dw(dy, x, csr.crow_indices, csr.col_indices, [1, 1], *fw, window)
    assert_close(dw, ref.linear_dw(dy, x, mask), dtype=dtype)
    assert bool((dw[~mask] == 0).all()), "dW must be exactly zero outside the pattern"


def test_windowed_bit_identical_across_thread_counts():
    torch.manual_seed(5)
    N, K, M = 300, 150, 97
    mask = make_mask((M, K), "random", 0.2)
    csr = pattern_of(mask).csr()
    w, x, dy = torch.randn(M, K), torch.randn(N, K), torch.randn(N, M)
    fw = _windows(csr.crow_indices, csr.col_indices, K, 16)
    tw = _windows(csr.ccol_indices, csr.row_indices, M, 16)

    def run():
        return (
            torch.ops.sparsekern.linear_fwd(x, w, None, csr.crow_indices, csr.col_indices, [1, 1], *fw, 16),
            torch.ops.sparsekern.linear_dx(dy, w, csr.ccol_indices, csr.row_indices, [1, 1], *tw, 16),
            torch.ops.sparsekern.linear_dw(dy, x, csr.crow_indices, csr.col_indices, [1, 1], *fw, 16),
        )

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_backend_uses_windows_and_gradcheck(monkeypatch):
    # lower the size gates so a small layer takes the window-major path through autograd
    monkeypatch.setattr(cppmod, "WINDOW", 4)
    monkeypatch.setattr(cppmod, "WINDOW_MIN_BATCH", 1)
    monkeypatch.setattr(cppmod, "WINDOW_MIN_DENSITY", 0.0)
    M, K = 11, 19
    mask = make_mask((M, K), "random", 0.4)
    pat = pattern_of(mask)
    assert cppmod._window_args(pat, 3, transposed=False)["window"] == 4
    x = torch.randn(3, K, dtype=torch.float64, requires_grad=True)
    w = torch.randn(M, K, dtype=torch.float64, requires_grad=True)
    b = torch.randn(M, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return sparsekern.sparse_linear(x, w, b, mask, backend="cpp")

    assert torch.autograd.gradcheck(f, (x, w, b))
    # the metadata is built once per pattern and direction, into the mask's cache
    windows = {k[2:] for k in pat.cache.keys() if k[:2] == ("csr", "cpp.windows")}
    assert windows == {(False, 4), (True, 4)}


def test_window_gates():
    mask = make_mask((64, 4096), "random", 0.1)
    pat = pattern_of(mask)
    assert cppmod._window_args(pat, 2048, transposed=False)["window"] == cppmod.WINDOW
    assert cppmod._window_args(pat, 2048, transposed=True)["window"] == cppmod.WINDOW
    assert cppmod._window_args(pat, 256, transposed=False) == {}  # small batch
    sparse = pattern_of(make_mask((64, 4096), "random", 0.02))
    assert cppmod._window_args(sparse, 2048, transposed=False) == {}  # too few nonzeros per window


def test_windows_bad_input():
    mask = make_mask((6, 10), "random", 0.5)
    csr = pattern_of(mask).csr()
    x, w = torch.randn(4, 10), torch.randn(6, 10)
    wptr, widx = _windows(csr.crow_indices, csr.col_indices, 10, 4)
    fwd = torch.ops.sparsekern.linear_fwd
    args = (x, w, None, csr.crow_indices, csr.col_indices, [1, 1])
    with pytest.raises(RuntimeError, match="pass both or neither"):
        fwd(*args, wptr, None, 4)
    with pytest.raises(RuntimeError, match="window"):
        fwd(*args, wptr, widx, 0)
    with pytest.raises(RuntimeError, match="win_ptr: expected"):
        fwd(*args, wptr, widx, 3)  # metadata built for another window width
    with pytest.raises(RuntimeError, match="win_idx: expected"):
        fwd(*args, wptr, widx[:-1].contiguous(), 4)
    with pytest.raises(RuntimeError, match="int32"):
        fwd(*args, wptr.long(), widx, 4)
    bad = widx.clone()
    bad[0] = 99
    with pytest.raises(RuntimeError, match="win_idx: entries must lie"):
        fwd(*args, wptr, bad, 4)
    with pytest.raises(RuntimeError, match="unstructured"):
        bsr = pattern_of(make_block_mask((6, 10), (16, 16), 1.0), "block", 16).bsr()
        fwd(x, w, None, bsr.crow_indices, bsr.col_indices, list(bsr.block), wptr, widx, 4)
    dy = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="win_ptr: expected"):
        torch.ops.sparsekern.linear_dw(dy, x, csr.crow_indices, csr.col_indices, [1, 1], wptr, widx, 5)
    with pytest.raises(RuntimeError, match="window: expected a positive"):
        _windows(csr.crow_indices, csr.col_indices, 10, 0)


def test_opcheck_windowed():
    mask = make_mask((12, 20), "random", 0.3)
    csr = pattern_of(mask).csr()
    x, w, dy = torch.randn(5, 20), torch.randn(12, 20), torch.randn(5, 12)
    fw = _windows(csr.crow_indices, csr.col_indices, 20, 8)
    tw = _windows(csr.ccol_indices, csr.row_indices, 12, 8)
    ops = torch.ops.sparsekern
    torch.library.opcheck(ops.csr_windows.default, (csr.crow_indices, csr.col_indices, 20, 8))
    torch.library.opcheck(ops.linear_fwd.default, (x, w, None, csr.crow_indices, csr.col_indices, [1, 1], *fw, 8))
    torch.library.opcheck(ops.linear_dx.default, (dy, w, csr.ccol_indices, csr.row_indices, [1, 1], *tw, 8))
    torch.library.opcheck(ops.linear_dw.default, (dy, x, csr.crow_indices, csr.col_indices, [1, 1], *fw, 8))
