"""What only the ``cpp`` backend has: the built extension and its selection, threads and
bit-identical results for any thread count, the instruction sets (``cpu_isa``), the conv2d
algorithms (``SPARSEKERN_CPU_CONV_ALGO``, ``conv2d_algo``) and the column-window path of the
unstructured linear ops (``csr_windows``, ``SPARSEKERN_CPU_WINDOWS``).  The op results themselves
are checked in tests/ops/.

Every test needs the built extension (``requires_cpp``): with ``SPARSEKERN_STRICT=1`` or
``CI=true`` a missing build fails them instead of skipping.
"""

from __future__ import annotations

import pytest
import torch

import sparsekern
from sparsekern import reference as ref
from sparsekern._backends import BackendError, CallInfo, ConvParams, select_backend
from sparsekern.formats import Pattern, pattern_of
from sparsekern.kernels import cpu as cppmod
from sparsekern.testing import (
    CONFORMANCE,
    assert_close,
    conv_cases,
    linear_cases,
    make_block_mask,
    make_mask,
)
from tests.ops.helpers import check_conv_case, check_linear_case, gradcheck
from tests.support import DTYPE_IDS, Target, requires_cpp

pytestmark = requires_cpp

CPP = Target("cpp")
DTYPES = [torch.float32, torch.float64]
ISAS = ("avx512", "avx2", "generic")
ALGOS = ("direct", "gemm")


@pytest.fixture
def be():
    return cppmod.CppBackend()


def test_extension_built_and_selected():
    ok, why = cppmod.load_library()
    assert ok, why
    assert torch.ops.sparsekern.cpu_isa() in ISAS
    info = CallInfo("linear", torch.device("cpu"), torch.float32, "unstructured", None, "unstructured")
    assert select_backend(info).name == "cpp"
    conv = CallInfo(
        "conv2d", torch.device("cpu"), torch.float32, "block", (16, 144), "block", ConvParams(), (32, 16, 3, 3)
    )
    assert select_backend(conv).name == "cpp"


def test_kernels_threaded_like_torch():
    # at::parallel_for is an OpenMP pragma in a header: a build without -fopenmp silently runs
    # every kernel on one thread.  Where torch itself uses OpenMP, the kernels must too.
    if "OpenMP" in torch.__config__.parallel_info():
        assert torch.ops.sparsekern.parallel_backend() == "openmp"
    else:
        assert torch.ops.sparsekern.parallel_backend() in ("openmp", "serial")


def test_supports_refuses_with_reason(be):
    fp16 = CallInfo("linear", torch.device("cpu"), torch.float16, "unstructured", None, "unstructured")
    ok, why = be.supports(fp16)
    assert not ok and "bfloat16" in why
    grouped = CallInfo(
        "conv2d", torch.device("cpu"), torch.float32, "unstructured", None, "unstructured",
        ConvParams(groups=2), (8, 4, 3, 3),
    )  # fmt: skip
    ok, why = be.supports(grouped)
    assert not ok and "depthwise" in why
    assert select_backend(grouped).name == "reference"  # the automatic order falls back
    with pytest.raises(BackendError, match="depthwise"):
        select_backend(grouped, "cpp")
    depthwise = CallInfo(
        "conv2d", torch.device("cpu"), torch.float32, "unstructured", None, "unstructured",
        ConvParams(groups=4), (8, 1, 3, 3),
    )  # fmt: skip
    assert be.supports(depthwise) == (True, "")


# ------------------------------------------------------------------------------------------------
# bit-identical results for any thread count
# ------------------------------------------------------------------------------------------------


def _patterned(shape, layout, density=0.2, block_density=0.5):
    if layout == "block":
        return pattern_of(make_block_mask(shape, (16, 16), block_density), "block", 16)
    return Pattern(make_mask(shape, "random", density))


def _all_passes(be, layout):
    torch.manual_seed(3)
    n, k, m = 257, 130, 96
    pat = _patterned((m, k), layout)
    w, x, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(n, m)
    outs = [be.linear_fwd(x, w, None, pat), be.linear_dx(dy, w, pat), be.linear_dw(dy, x, pat)]
    wc, xc = torch.randn(40, 24, 3, 3), torch.randn(3, 24, 11, 10)
    cpat = _patterned(wc.shape, layout, block_density=0.6)
    conv = ConvParams((1, 1), (1, 1), (1, 1), 1)
    yc = be.conv2d_fwd(xc, wc, None, cpat, conv)
    dyc = torch.randn_like(yc)
    return outs + [yc, be.conv2d_dx(dyc, wc, cpat, tuple(xc.shape), conv), be.conv2d_dw(dyc, xc, cpat, wc.shape, conv)]


def _conv_passes(be, layout):
    torch.manual_seed(5)
    wshape = (40, 32, 3, 3)
    pat = _patterned(wshape, layout)
    w, x = torch.randn(wshape), torch.randn(5, 32, 18, 17)  # 8 tiles or more, spanning images
    outs = []
    for s in (1, 2):
        conv = ConvParams((s, s), (1, 1), (1, 1), 1)
        y = be.conv2d_fwd(x, w, torch.randn(40), pat, conv)
        dy = torch.randn_like(y)
        outs += [y, be.conv2d_dx(dy, w, pat, tuple(x.shape), conv), be.conv2d_dw(dy, x, pat, wshape, conv)]
    return outs


def _assert_same_for_1_and_2_threads(run):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
        again = run()
    finally:
        torch.set_num_threads(before)
    for a, b, c in zip(one, two, again):
        assert torch.equal(a, b) and torch.equal(b, c)


@pytest.mark.parametrize("layout", ["unstructured", "block"])
def test_bit_identical_across_thread_counts(be, layout):
    _assert_same_for_1_and_2_threads(lambda: _all_passes(be, layout))


@pytest.mark.parametrize("layout", ["unstructured", "block"])
def test_conv2d_direct_bit_identical_across_thread_counts(be, monkeypatch, layout):
    monkeypatch.setenv("SPARSEKERN_CPU_CONV_ALGO", "direct")
    _assert_same_for_1_and_2_threads(lambda: _conv_passes(be, layout))


# ------------------------------------------------------------------------------------------------
# every instruction set this CPU can run
# ------------------------------------------------------------------------------------------------


def _isa_ok(isa: str) -> bool:
    before = torch.ops.sparsekern.cpu_isa()
    try:
        torch.ops.sparsekern.cpu_isa(isa)
        return True
    except RuntimeError:
        return False
    finally:
        torch.ops.sparsekern.cpu_isa(before)


@pytest.fixture(params=ISAS)
def isa(request):
    """Switch the kernels to one instruction set for the test (skipped where the CPU lacks it)."""
    if not _isa_ok(request.param):
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    before = torch.ops.sparsekern.cpu_isa()
    assert cppmod.cpu_isa(request.param) == request.param
    yield request.param
    cppmod.cpu_isa(before)


def test_instruction_set_selection():
    assert _isa_ok("generic")
    with pytest.raises(RuntimeError, match="instruction set"):
        torch.ops.sparsekern.cpu_isa("sse9")


# a few cases of each kind from the shared lists: unstructured (one off a tile), block, uneven rows
ISA_LINEAR_IDS = (
    "N4-K33-M31-d0.1-unstructured",
    "N9-K45-M37-d0.3-unstructured-skewed",
    "N5-K47-M33-d0.5-b16x16",
    "N70-K65-M63-d0.5-b32x32",
)
ISA_LINEAR = [c for c in linear_cases() if c.id in ISA_LINEAR_IDS]
ISA_CONV = [c for c in conv_cases() if c.id.startswith(("N1-C5-O6-9x8", "N2-C20-O33-7x6", "N2-C4-O8-8x9"))]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", ISA_LINEAR, ids=lambda c: c.id)
def test_every_instruction_set_linear(isa, case, dtype):
    check_linear_case(CPP, case, dtype)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", ISA_CONV, ids=lambda c: c.id)
def test_every_instruction_set_conv2d(isa, monkeypatch, case, dtype, algo):
    monkeypatch.setenv("SPARSEKERN_CPU_CONV_ALGO", algo)
    check_conv_case(CPP, case, dtype)


# ------------------------------------------------------------------------------------------------
# conv2d algorithms: direct (shifted views) and implicit GEMM, forced through the environment
# ------------------------------------------------------------------------------------------------

ALGO_CASES = [c for c in conv_cases(CONFORMANCE) if c.groups == 1 and c.size != "gpu"]


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", ALGO_CASES, ids=lambda c: c.id)
def test_conv2d_algo_matches_dense(monkeypatch, case, dtype, algo):
    monkeypatch.setenv("SPARSEKERN_CPU_CONV_ALGO", algo)
    check_conv_case(CPP, case, dtype)


@pytest.mark.parametrize("case", [c for c in conv_cases("tiny") if c.groups == 1], ids=lambda c: c.id)
def test_gradcheck_conv2d_direct(monkeypatch, case):
    monkeypatch.setenv("SPARSEKERN_CPU_CONV_ALGO", "direct")
    conv = case.conv
    mask = case.weight_mask(case.weight_shape)
    x = torch.randn(case.batch, case.in_channels, *case.hw, dtype=torch.float64, requires_grad=True)
    w = torch.randn(case.weight_shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(case.out_channels, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return sparsekern.sparse_conv2d(x, w, b, mask, None, conv.stride, conv.padding, conv.dilation, 1, backend="cpp")

    gradcheck(CPP, f, (x, w, b))


def test_conv2d_auto_algo_is_valid_and_forced_by_env(be, monkeypatch):
    def force(algo):
        monkeypatch.setenv("SPARSEKERN_CPU_CONV_ALGO", algo)

    shapes = [  # (input, weight, stride): ResNet-18 CIFAR 3x3 layers, a 1x1 and a tiny one
        ([32, 64, 32, 32], [64, 64, 3, 3], 1), ([32, 64, 32, 32], [128, 64, 3, 3], 2),
        ([32, 128, 16, 16], [128, 128, 3, 3], 1), ([32, 256, 8, 8], [256, 256, 3, 3], 1),
        ([32, 512, 4, 4], [512, 512, 3, 3], 1), ([8, 16, 32, 32], [32, 16, 1, 1], 2), ([1, 2, 3, 3], [2, 2, 3, 3], 1),
    ]  # fmt: skip
    force("auto")
    picked, pats = {}, {}
    for xs, ws, s in shapes:
        pats[tuple(ws)] = Pattern(make_mask(ws, "random", 0.1))
        for op in ("fwd", "dx", "dw"):
            got = cppmod.conv2d_algo(op, xs, ws, s, 1, pattern=pats[tuple(ws)])
            assert got in ALGOS
            picked[(tuple(xs), tuple(ws), s, op)] = got
    # the documented rule: large planes go direct; 4x4 planes and a 1x1 kernel at stride 2 (which
    # reads one phase of four) stay on implicit GEMM
    assert picked[((32, 64, 32, 32), (64, 64, 3, 3), 1, "fwd")] == "direct"
    assert picked[((32, 512, 4, 4), (512, 512, 3, 3), 1, "dx")] == "gemm"
    assert picked[((8, 16, 32, 32), (32, 16, 1, 1), 2, "fwd")] == "gemm"
    # and so do dense patterns (density above 0.15)
    assert cppmod.conv2d_algo("fwd", [32, 64, 32, 32], [64, 64, 3, 3], 1, 1) == "gemm"
    # deterministic: the same answer again, and what the op runs agrees with a forced run bit for bit
    for key, got in picked.items():
        assert cppmod.conv2d_algo(key[3], list(key[0]), list(key[1]), key[2], 1, pattern=pats[key[1]]) == got
    pat = Pattern(make_mask((6, 4, 3, 3), "random", 0.1))
    x, w = torch.randn(2, 4, 17, 16), torch.randn(6, 4, 3, 3)
    conv = ConvParams((1, 1), (1, 1), (1, 1), 1)
    auto_y = be.conv2d_fwd(x, w, None, pat, conv)
    force(cppmod.conv2d_algo("fwd", list(x.shape), list(w.shape), 1, 1, pattern=pat))
    assert torch.equal(auto_y, be.conv2d_fwd(x, w, None, pat, conv))
    for forced in ALGOS:
        force(forced)
        assert cppmod.conv2d_algo("dw", [32, 512, 4, 4], [512, 512, 3, 3], 1, 1) == forced
    force("fastest")
    with pytest.raises(RuntimeError, match="SPARSEKERN_CPU_CONV_ALGO"):
        be.conv2d_fwd(x, w, None, pat, conv)
    force("auto")
    with pytest.raises(RuntimeError, match="op: expected"):
        cppmod.conv2d_algo("bwd", [1, 2, 3, 3], [2, 2, 3, 3])


# ------------------------------------------------------------------------------------------------
# the window-major path of the unstructured linear ops (csr_windows; win_ptr / win_idx / window),
# on small windows so every case spans several of them
# ------------------------------------------------------------------------------------------------


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


# the unstructured shared cases with a plain [N, K] input
WINDOW_CASES = [c for c in linear_cases() if c.block is None and c.x_layout == "contiguous" and len(c.batch) == 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("window", [2, 16])
@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: c.id)
def test_windowed_linear_fwd_dx_dw_vs_reference(case, window, dtype):
    M, K, N = case.out_features, case.in_features, case.batch[0]
    mask = case.weight_mask((M, K))
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

    _assert_same_for_1_and_2_threads(run)


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


def test_window_gates(monkeypatch):
    mask = make_mask((64, 4096), "random", 0.1)
    pat = pattern_of(mask)
    assert cppmod._window_args(pat, 2048, transposed=False)["window"] == cppmod.WINDOW
    assert cppmod._window_args(pat, 2048, transposed=True)["window"] == cppmod.WINDOW
    assert cppmod._window_args(pat, 256, transposed=False) == {}  # small batch
    sparse = pattern_of(make_mask((64, 4096), "random", 0.02))
    assert cppmod._window_args(sparse, 2048, transposed=False) == {}  # too few nonzeros per window
    monkeypatch.setenv("SPARSEKERN_CPU_WINDOWS", "0")  # the switch turns the path off
    assert cppmod._window_args(pat, 2048, transposed=False) == {}


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


# Batches on each side of the unstructured tile widths (common.h kPanelVecs / kSddmmVecs: float
# tiles of 32, 64, 96, 128 batch columns for the panels, 64, 96, 128, 256 for the weight gradient).
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("N", [31, 33, 64, 65, 80, 96, 97, 128, 129, 200])
def test_linear_every_tile_width_vs_reference(N, dtype):
    torch.manual_seed(N)
    M, K = 37, 53
    mask = make_mask((M, K), "random", 0.3)
    mask[5] = False  # an empty row
    w, x, dy, b = (torch.randn(*s, dtype=dtype) for s in ((M, K), (N, K), (N, M), (M,)))
    csr = pattern_of(mask).csr()
    wp = w.masked_fill(~mask, float("nan"))  # reading a pruned entry would show as NaN
    y = torch.ops.sparsekern.linear_fwd(x, wp, b, csr.crow_indices, csr.col_indices, [1, 1])
    assert_close(y, ref.linear_fwd(x, w, b, mask), dtype=dtype)
    dx = torch.ops.sparsekern.linear_dx(dy, wp, csr.ccol_indices, csr.row_indices, [1, 1])
    assert_close(dx, ref.linear_dx(dy, w, mask), dtype=dtype)
    dw = torch.ops.sparsekern.linear_dw(dy, x, csr.crow_indices, csr.col_indices, [1, 1])
    assert_close(dw, ref.linear_dw(dy, x, mask), dtype=dtype)
    assert bool((dw[~mask] == 0).all()), "dW must be exactly zero outside the pattern"


def test_linear_96_row_tile_same_bits_as_the_128_row_tile():
    # 96 rows take the 6-vector float tile, 128 rows the 8-vector one; a batch either covers in
    # one tile gets the same sums: rows of y and dx are equal bit for bit, and dW of the 96 rows
    # equals dW of the same rows with 32 zero rows appended
    torch.manual_seed(96)
    M, K = 300, 250
    mask = make_mask((M, K), "random", 0.1)
    csr = pattern_of(mask).csr()
    w = torch.randn(M, K)
    x, dy = torch.zeros(128, K), torch.zeros(128, M)
    x[:96], dy[:96] = torch.randn(96, K), torch.randn(96, M)
    ops = torch.ops.sparsekern

    def run(n):
        xs, dys = x[:n].contiguous(), dy[:n].contiguous()
        return (
            ops.linear_fwd(xs, w, None, csr.crow_indices, csr.col_indices, [1, 1]),
            ops.linear_dx(dys, w, csr.ccol_indices, csr.row_indices, [1, 1]),
            ops.linear_dw(dys, xs, csr.crow_indices, csr.col_indices, [1, 1]),
        )

    (y96, dx96, dw96), (y128, dx128, dw128) = run(96), run(128)
    assert torch.equal(y96, y128[:96])
    assert torch.equal(dx96, dx128[:96])
    assert torch.equal(dw96, dw128)
