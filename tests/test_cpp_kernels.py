"""The ``cpp`` backend (C++ CPU kernels in csrc/) against the reference.

With ``CI=true`` or ``SPARSEKERN_REQUIRE_CPP=1`` in the environment every test here FAILS when
``sparsekern._C`` is not built, so a broken build cannot pass as a run of skips; elsewhere the
tests skip with the reason.
"""

from __future__ import annotations

import os

import pytest
import torch

import sparsekern
from sparsekern import reference as ref
from sparsekern._backends import BackendError, CallInfo, ConvParams, select_backend
from sparsekern.formats import Pattern, expand_block_mask, pattern_of
from sparsekern.kernels import cpu as cppmod
from sparsekern.testing import assert_close, conv_cases, linear_cases, make_block_mask, make_mask

REQUIRE = os.environ.get("CI", "").lower() == "true" or os.environ.get("SPARSEKERN_REQUIRE_CPP", "") == "1"
OK, WHY = cppmod.load_library()
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(autouse=True)
def _need_cpp():
    if not OK:
        if REQUIRE:
            pytest.fail(f"sparsekern._C is required here (CI / SPARSEKERN_REQUIRE_CPP) but not usable: {WHY}")
        pytest.skip(f"C++ kernels not built: {WHY}")


@pytest.fixture
def be():
    return cppmod.CppBackend()


def test_extension_built_and_selected():
    assert OK, WHY
    assert torch.ops.sparsekern.cpu_isa() in ("avx512", "avx2", "generic")
    info = CallInfo("linear", torch.device("cpu"), torch.float32, "unstructured", None, "unstructured")
    assert select_backend(info).name == "cpp"
    conv = CallInfo("conv2d", torch.device("cpu"), torch.float32, "block", (16, 144), "block", ConvParams(), (32, 16, 3, 3))
    assert select_backend(conv).name == "cpp"


def test_kernels_threaded_like_torch():
    # at::parallel_for is an OpenMP pragma in a header: a build without -fopenmp silently runs
    # every kernel on one thread.  Where torch itself uses OpenMP, the kernels must too.
    assert OK, WHY
    if "OpenMP" in torch.__config__.parallel_info():
        assert torch.ops.sparsekern.parallel_backend() == "openmp"
    else:
        assert torch.ops.sparsekern.parallel_backend() in ("openmp", "serial")


def test_supports_refuses_with_reason(be):
    bf16 = CallInfo("linear", torch.device("cpu"), torch.bfloat16, "unstructured", None, "unstructured")
    ok, why = be.supports(bf16)
    assert not ok and "float32" in why
    grouped = CallInfo(
        "conv2d", torch.device("cpu"), torch.float32, "unstructured", None, "unstructured",
        ConvParams(groups=2), (8, 4, 3, 3),
    )
    ok, why = be.supports(grouped)
    assert not ok and "depthwise" in why
    assert select_backend(grouped).name == "reference"  # the automatic order falls back
    with pytest.raises(BackendError, match="depthwise"):
        select_backend(grouped, "cpp")
    depthwise = CallInfo(
        "conv2d", torch.device("cpu"), torch.float32, "unstructured", None, "unstructured",
        ConvParams(groups=4), (8, 1, 3, 3),
    )
    assert be.supports(depthwise) == (True, "")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _poisoned(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The weight with NaN outside the mask: a kernel that reads a pruned entry produces NaN."""
    return weight.masked_fill(~mask, float("nan"))


def _sub_mask(mask: torch.Tensor, keep: float = 0.6) -> torch.Tensor:
    """A gradient mask strictly inside ``mask`` (when it has more than one entry)."""
    return mask & (torch.rand(mask.shape) < keep)


def _check_linear(be, x, w, b, pat, gpat, dtype):
    M, K = w.shape
    wp = _poisoned(w, pat.mask)
    y = be.linear_fwd(x, wp, b, pat)
    assert_close(y, ref.linear_fwd(x, w, b, pat.mask), dtype=dtype)
    dy = torch.randn(x.shape[0], M, dtype=dtype)
    dx = be.linear_dx(dy, wp, pat)
    assert_close(dx, ref.linear_dx(dy, w, pat.mask), dtype=dtype)
    dw = be.linear_dw(dy, x, gpat)
    assert_close(dw, ref.linear_dw(dy, x, gpat.mask), dtype=dtype)
    assert bool((dw[~gpat.mask] == 0).all()), "dW must be exactly zero outside the gradient mask"


# ------------------------------------------------------------------------------------------------
# linear
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", linear_cases(), ids=lambda c: c.id)
def test_linear_fwd_dx_dw_unstructured_vs_reference(be, case, dtype):
    M, K = case.out_features, case.in_features
    mask = make_mask((M, K), case.kind, case.density)
    w = torch.randn(M, K, dtype=dtype)
    x = torch.randn(case.batch, K, dtype=dtype)
    b = torch.randn(M, dtype=dtype)
    pat = Pattern(mask)
    _check_linear(be, x, w, b, pat, Pattern(_sub_mask(mask)), dtype)
    _check_linear(be, x, w, None, pat, pat, dtype)


BLOCK_LINEAR = [
    # (batch, in, out, block, density, empty block rows)
    (3, 47, 33, 16, 0.4, False),
    (1, 64, 80, 16, 0.5, True),
    (70, 65, 63, 32, 0.5, False),
    (5, 130, 97, 64, 0.6, True),
    (4, 96, 64, (16, 32), 0.5, False),
    (2, 32, 32, 32, 1.0, False),
    (2, 32, 32, 32, 0.0, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k,m,block,density,empty", BLOCK_LINEAR, ids=lambda v: str(v))
def test_linear_fwd_dx_dw_block_vs_reference(be, n, k, m, block, density, empty, dtype):
    blk = block if isinstance(block, tuple) else (block, block)
    mask = make_block_mask((m, k), blk, density, empty_block_rows=empty)
    w = torch.randn(m, k, dtype=dtype)
    x = torch.randn(n, k, dtype=dtype)
    b = torch.randn(m, dtype=dtype)
    pat = pattern_of(mask, "block", blk)
    # gradient pattern: a block subset, and an unstructured subset of the block mask
    gblock = mask & make_block_mask((m, k), blk, 0.6)
    _check_linear(be, x, w, b, pat, Pattern(gblock, "block", pat.block_size), dtype)
    _check_linear(be, x, w, None, pat, Pattern(_sub_mask(mask)), dtype)


def test_linear_larger_unstructured(be):
    """A shape with several tiles in every direction and uneven rows (exercises row chunking)."""
    n, k, m = 300, 200, 150
    mask = make_mask((m, k), "random", 0.1)
    mask[:20] = False
    mask[40:45] = True
    w, x = torch.randn(m, k), torch.randn(n, k)
    _check_linear(be, x, w, torch.randn(m), Pattern(mask), Pattern(_sub_mask(mask)), torch.float32)


def test_sparse_linear_noncontiguous_and_batched_input():
    M, K = 24, 40
    w = torch.randn(M, K, requires_grad=True)
    mask = make_mask((M, K), "random", 0.2)
    base = torch.randn(3, K, 5)
    x = base.transpose(1, 2).detach().requires_grad_(True)  # [3, 5, K], non-contiguous
    assert not x.is_contiguous()
    y = sparsekern.sparse_linear(x, w, None, mask, backend="cpp")
    x2 = x.detach().clone().requires_grad_(True)
    w2 = w.detach().clone().requires_grad_(True)
    y2 = sparsekern.sparse_linear(x2, w2, None, mask, backend="reference")
    assert_close(y, y2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    assert_close(x.grad, x2.grad)
    assert_close(w.grad, w2.grad)


# ------------------------------------------------------------------------------------------------
# conv2d
# ------------------------------------------------------------------------------------------------


def _check_conv(be, x, w, b, pat, gpat, conv, dtype):
    wp = _poisoned(w, pat.mask)
    y = be.conv2d_fwd(x, wp, b, pat, conv)
    assert_close(y, ref.conv2d_fwd(x, w, b, pat.mask, conv), dtype=dtype)
    dy = torch.randn_like(y)
    dx = be.conv2d_dx(dy, wp, pat, tuple(x.shape), conv)
    assert_close(dx, ref.conv2d_dx(dy, w, pat.mask, tuple(x.shape), conv), dtype=dtype)
    dw = be.conv2d_dw(dy, x, gpat, tuple(w.shape), conv)
    assert_close(dw, ref.conv2d_dw(dy, x, gpat.mask, tuple(w.shape), conv), dtype=dtype)
    assert bool((dw[~gpat.mask] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", conv_cases(), ids=lambda c: c.id)
def test_conv2d_fwd_dx_dw_unstructured_vs_reference(be, case, dtype):
    wshape = (case.out_channels, case.in_channels // case.groups, case.kernel, case.kernel)
    mask = make_mask(wshape, case.kind, case.density)
    w = torch.randn(wshape, dtype=dtype)
    x = torch.randn(case.batch, case.in_channels, *case.hw, dtype=dtype)
    b = torch.randn(case.out_channels, dtype=dtype)
    conv = ConvParams((case.stride,) * 2, (case.padding,) * 2, (case.dilation,) * 2, case.groups)
    pat = Pattern(mask)
    _check_conv(be, x, w, b, pat, Pattern(_sub_mask(mask)), conv, dtype)
    _check_conv(be, x, w, None, pat, pat, conv, dtype)


BLOCK_CONV = [
    # (batch, C_in, C_out, hw, kernel, stride, padding, dilation, block, density, empty block rows)
    (2, 20, 33, (7, 6), 3, 1, 1, 1, 16, 0.5, False),
    (1, 33, 17, (9, 9), 3, 2, 1, 1, 16, 0.5, True),
    (2, 40, 64, (5, 5), 3, 1, 2, 2, 32, 0.6, False),
    (3, 16, 16, (4, 4), 1, 1, 0, 1, 16, 1.0, False),
    (1, 70, 65, (4, 5), 3, 2, 0, 1, 64, 0.7, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c,o,hw,k,s,p,d,block,density,empty", BLOCK_CONV, ids=lambda v: str(v))
def test_conv2d_fwd_dx_dw_block_vs_reference(be, n, c, o, hw, k, s, p, d, block, density, empty, dtype):
    wshape = (o, c, k, k)
    blk = (block, block)
    mask = make_block_mask(wshape, blk, density, empty_block_rows=empty)
    w = torch.randn(wshape, dtype=dtype)
    x = torch.randn(n, c, *hw, dtype=dtype)
    b = torch.randn(o, dtype=dtype)
    conv = ConvParams((s, s), (p, p), (d, d), 1)
    pat = pattern_of(mask, "block", blk)
    gblock = mask & make_block_mask(wshape, blk, 0.6)
    _check_conv(be, x, w, b, pat, Pattern(gblock, "block", pat.block_size), conv, dtype)
    _check_conv(be, x, w, None, pat, Pattern(_sub_mask(mask)), conv, dtype)


@pytest.mark.parametrize("mult", [1, 2])
def test_dwconv2d_block_layout_and_multiplier(be, mult):
    C = 32
    wshape = (C * mult, 1, 3, 3)
    mask = make_block_mask(wshape, (16, 16), 0.5)
    w, x = torch.randn(wshape), torch.randn(2, C, 9, 7)
    conv = ConvParams((2, 1), (1, 1), (1, 2), C)
    pat = pattern_of(mask, "block", 16)
    _check_conv(be, x, w, torch.randn(C * mult), pat, Pattern(_sub_mask(mask)), conv, torch.float32)


# ------------------------------------------------------------------------------------------------
# gradcheck through the public ops
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["unstructured", "block"])
def test_gradcheck_sparse_linear(layout):
    M, K = 20, 18
    if layout == "block":
        tiles = torch.tensor([[True, False], [True, True]])  # a 2 x 2 grid of 16-tiles, cropped to 20 x 18
        mask = expand_block_mask(tiles, (16, 16), (M, K))
    else:
        mask = make_mask((M, K), "random", 0.3)
    gmask = _sub_mask(mask)
    x = torch.randn(3, K, dtype=torch.float64, requires_grad=True)
    w = torch.randn(M, K, dtype=torch.float64, requires_grad=True)
    b = torch.randn(M, dtype=torch.float64, requires_grad=True)
    kw = {"layout": layout, "block_size": 16 if layout == "block" else None, "backend": "cpp"}

    # the masked weight's derivative is the gradient-masked one, so check against the masked function
    def f(x, w, b):
        return sparsekern.sparse_linear(x, w, b, mask, **kw)

    assert torch.autograd.gradcheck(f, (x, w, b))
    y = sparsekern.sparse_linear(x, w, b, mask, gmask, **kw)
    y.sum().backward()
    assert bool((w.grad[~gmask] == 0).all())


@pytest.mark.parametrize("groups", [1, 4])
def test_gradcheck_sparse_conv2d(groups):
    cin, cout = 4, 8
    wshape = (cout, cin // groups, 3, 3)
    mask = make_mask(wshape, "random", 0.5)
    x = torch.randn(2, cin, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(wshape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(cout, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return sparsekern.sparse_conv2d(x, w, b, mask, None, 2, 1, 1, groups, backend="cpp")

    assert torch.autograd.gradcheck(f, (x, w, b))


# ------------------------------------------------------------------------------------------------
# opcheck: schemas, fake tensors, autograd registration of every op
# ------------------------------------------------------------------------------------------------


def _opcheck_samples():
    torch.manual_seed(1)
    n, k, m = 5, 20, 12
    mask = make_mask((m, k), "random", 0.3)
    csr = pattern_of(mask).csr()
    bmask = make_block_mask((m, k), (16, 16), 1.0)
    bsr = pattern_of(bmask, "block", 16).bsr()
    x, w, dy = torch.randn(n, k), torch.randn(m, k), torch.randn(n, m)
    out = [
        ("linear_fwd", (x, w, torch.randn(m), csr.crow_indices, csr.col_indices, [1, 1])),
        ("linear_fwd", (x, w, None, bsr.crow_indices, bsr.col_indices, list(bsr.block))),
        ("linear_dx", (dy, w, csr.ccol_indices, csr.row_indices, [1, 1])),
        ("linear_dw", (dy, x, csr.crow_indices, csr.col_indices, [1, 1])),
    ]
    xc, wc = torch.randn(2, 3, 6, 5), torch.randn(4, 3, 3, 3)
    cm = pattern_of(make_mask(wc.shape, "random", 0.4)).csr()
    sp = ([2, 1], [1, 1], [1, 1])
    dyc = torch.randn(2, 4, 3, 5)
    out += [
        ("conv2d_fwd", (xc, wc, torch.randn(4), cm.crow_indices, cm.col_indices, [1, 1], *sp)),
        ("conv2d_dx", (dyc, wc, cm.ccol_indices, cm.row_indices, [1, 1], [2, 3, 6, 5], *sp)),
        ("conv2d_dw", (dyc, xc, cm.crow_indices, cm.col_indices, [1, 1], [4, 3, 3, 3], *sp)),
    ]
    wd = torch.randn(6, 1, 3, 3)
    dm = pattern_of(make_mask(wd.shape, "random", 0.5)).csr()
    dyd = torch.randn(2, 6, 3, 5)
    out += [
        ("dwconv2d_fwd", (xc, wd, None, dm.crow_indices, dm.col_indices, *sp)),
        ("dwconv2d_dx", (dyd, wd, dm.crow_indices, dm.col_indices, [2, 3, 6, 5], *sp)),
        ("dwconv2d_dw", (dyd, xc, dm.crow_indices, dm.col_indices, [6, 1, 3, 3], *sp)),
    ]
    return out


@pytest.mark.parametrize("name,args", _opcheck_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.sparsekern, name).default, args)


# ------------------------------------------------------------------------------------------------
# determinism across thread counts
# ------------------------------------------------------------------------------------------------


def _all_passes(be, layout):
    torch.manual_seed(3)
    n, k, m = 257, 130, 96
    if layout == "block":
        mask = make_block_mask((m, k), (16, 16), 0.5)
        pat = pattern_of(mask, "block", 16)
    else:
        mask = make_mask((m, k), "random", 0.2)
        pat = Pattern(mask)
    w, x, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(n, m)
    outs = [be.linear_fwd(x, w, None, pat), be.linear_dx(dy, w, pat), be.linear_dw(dy, x, pat)]
    wc = torch.randn(40, 24, 3, 3)
    cmask = make_block_mask(wc.shape, (16, 16), 0.6) if layout == "block" else make_mask(wc.shape, "random", 0.2)
    cpat = pattern_of(cmask, "block", 16) if layout == "block" else Pattern(cmask)
    xc = torch.randn(3, 24, 11, 10)
    conv = ConvParams((1, 1), (1, 1), (1, 1), 1)
    yc = be.conv2d_fwd(xc, wc, None, cpat, conv)
    dyc = torch.randn_like(yc)
    outs += [yc, be.conv2d_dx(dyc, wc, cpat, tuple(xc.shape), conv)]
    outs += [be.conv2d_dw(dyc, xc, cpat, tuple(wc.shape), conv)]
    return outs


@pytest.mark.parametrize("layout", ["unstructured", "block"])
def test_bit_identical_across_thread_counts(be, layout):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _all_passes(be, layout)
        torch.set_num_threads(2)
        two = _all_passes(be, layout)
        again = _all_passes(be, layout)
    finally:
        torch.set_num_threads(before)
    for a, b, c in zip(one, two, again):
        assert torch.equal(a, b) and torch.equal(b, c)


# ------------------------------------------------------------------------------------------------
# every instruction set this CPU can run
# ------------------------------------------------------------------------------------------------


def test_every_instruction_set_matches_reference(be):
    before = torch.ops.sparsekern.cpu_isa()
    isas = [i for i in ("avx512", "avx2", "generic") if _isa_ok(i)]
    assert "generic" in isas
    try:
        for isa in isas:
            assert cppmod.cpu_isa(isa) == isa
            mask = make_mask((37, 45), "random", 0.3)
            w, x = torch.randn(37, 45), torch.randn(70, 45)
            _check_linear(be, x, w, torch.randn(37), Pattern(mask), Pattern(_sub_mask(mask)), torch.float32)
            bm = make_block_mask((37, 45), (16, 16), 0.6)
            _check_linear(
                be, x.double(), w.double(), None, pattern_of(bm, "block", 16), Pattern(_sub_mask(bm)), torch.float64
            )
            wc = torch.randn(9, 5, 3, 3)
            cm = make_mask(wc.shape, "random", 0.4)
            conv = ConvParams((2, 2), (1, 1), (1, 1), 1)
            _check_conv(be, torch.randn(2, 5, 8, 7), wc, None, Pattern(cm), Pattern(cm), conv, torch.float32)
    finally:
        cppmod.cpu_isa(before)
    with pytest.raises(RuntimeError, match="instruction set"):
        torch.ops.sparsekern.cpu_isa("sse9")


def _isa_ok(isa: str) -> bool:
    before = torch.ops.sparsekern.cpu_isa()
    try:
        torch.ops.sparsekern.cpu_isa(isa)
        return True
    except RuntimeError:
        return False
    finally:
        torch.ops.sparsekern.cpu_isa(before)


# ------------------------------------------------------------------------------------------------
# bad input raises a clear error (never a crash)
# ------------------------------------------------------------------------------------------------


def _linear_args():
    mask = make_mask((6, 10), "random", 0.5)
    csr = pattern_of(mask).csr()
    return torch.randn(4, 10), torch.randn(6, 10), csr.crow_indices.clone(), csr.col_indices.clone()


def test_bad_input_raises():
    op = torch.ops.sparsekern.linear_fwd
    x, w, crow, col = _linear_args()
    with pytest.raises(RuntimeError, match="x: expected dtype float32 or float64"):
        op(x.long(), w, None, crow, col, [1, 1])
    with pytest.raises(RuntimeError, match=r"x: expected dtype torch.float32|x: expected dtype Float"):
        op(x.double(), w, None, crow, col, [1, 1])
    # meta tensors route to the fake kernel: shapes only, no data touched
    assert op(x.to("meta"), w.to("meta"), None, crow.to("meta"), col.to("meta"), [1, 1]).shape == (4, 6)
    with pytest.raises(RuntimeError, match="weight: expected shape"):
        op(x, torch.randn(6, 11), None, crow, col, [1, 1])
    with pytest.raises(RuntimeError, match="bias: expected shape"):
        op(x, w, torch.randn(5), crow, col, [1, 1])
    with pytest.raises(RuntimeError, match="crow_indices: expected dtype int32"):
        op(x, w, None, crow.long(), col, [1, 1])
    with pytest.raises(RuntimeError, match="col_indices: expected a contiguous tensor"):
        op(x, w, None, crow, torch.stack([col, col], 1)[:, 0], [1, 1])
    with pytest.raises(RuntimeError, match="crow_indices: expected 7 entries"):
        op(x, w, None, crow[:-1].contiguous(), col, [1, 1])
    bad = col.clone()
    bad[0] = 10
    with pytest.raises(RuntimeError, match=r"col_indices: entries must lie in \[0, 10\)"):
        op(x, w, None, crow, bad, [1, 1])
    badp = crow.clone()
    badp[2], badp[3] = badp[3], badp[2] - 1
    with pytest.raises(RuntimeError, match="crow_indices"):
        op(x, w, None, badp, col, [1, 1])
    with pytest.raises(RuntimeError, match="block: expected positive sides"):
        op(x, w, None, crow, col, [0, 1])
    with pytest.raises(RuntimeError, match="dy: expected shape"):
        torch.ops.sparsekern.linear_dx(torch.randn(4, 7), w, crow, col, [1, 1])
    with pytest.raises(RuntimeError, match="x: expected 4 rows"):
        torch.ops.sparsekern.linear_dw(torch.randn(4, 6), torch.randn(3, 10), crow, col, [1, 1])
    xc, wc = torch.randn(1, 3, 2, 2), torch.randn(4, 3, 3, 3)
    cm = pattern_of(torch.ones(4, 3, 3, 3, dtype=torch.bool)).csr()
    with pytest.raises(RuntimeError, match="too small for the kernel"):
        torch.ops.sparsekern.conv2d_fwd(xc, wc, None, cm.crow_indices, cm.col_indices, [1, 1], [1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="stride: expected values >= 1"):
        torch.ops.sparsekern.conv2d_fwd(xc, wc, None, cm.crow_indices, cm.col_indices, [1, 1], [0, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="depthwise"):
        torch.ops.sparsekern.dwconv2d_fwd(
            torch.randn(1, 3, 5, 5), torch.randn(4, 1, 3, 3), None, cm.crow_indices[:5], cm.col_indices[:0],
            [1, 1], [1, 1], [1, 1],
        )


def test_module_training_step_matches_reference():
    torch.manual_seed(5)
    lin = torch.nn.Linear(30, 20)
    a = sparsekern.SparseLinear.from_dense(lin, make_mask((20, 30), "random", 0.3))
    b = sparsekern.SparseLinear.from_dense(lin, a.weight_mask.clone())
    a.backend, b.backend = "cpp", "reference"
    x = torch.randn(7, 30)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    assert_close(a.weight.grad, b.weight.grad)
    assert_close(a.bias.grad, b.bias.grad)


# ------------------------------------------------------------------------------------------------
# conv2d algorithms: direct (shifted views) and implicit GEMM, forced through the environment
# ------------------------------------------------------------------------------------------------

ALGOS = ["direct", "gemm"]


@pytest.fixture
def algo_env(monkeypatch):
    def force(algo):
        monkeypatch.setenv("SPARSEKERN_CPU_CONV_ALGO", algo)

    return force


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [c for c in conv_cases() if c.groups == 1], ids=lambda c: c.id)
def test_conv2d_algo_unstructured_vs_reference(be, algo_env, case, dtype, algo):
    algo_env(algo)
    wshape = (case.out_channels, case.in_channels, case.kernel, case.kernel)
    mask = make_mask(wshape, case.kind, case.density)
    w = torch.randn(wshape, dtype=dtype)
    x = torch.randn(case.batch, case.in_channels, *case.hw, dtype=dtype)
    conv = ConvParams((case.stride,) * 2, (case.padding,) * 2, (case.dilation,) * 2, 1)
    pat = Pattern(mask)
    _check_conv(be, x, w, torch.randn(case.out_channels, dtype=dtype), pat, Pattern(_sub_mask(mask)), conv, dtype)


# stride / padding / dilation mixes per axis, rectangular kernels, and planes large enough for
# several tiles spanning images
DIRECT_GEOMS = [
    # (batch, C_in, C_out, hw, kernel, stride, padding, dilation)
    (3, 5, 7, (19, 17), (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 4, 6, (17, 20), (3, 2), (2, 1), (0, 2), (1, 2)),
    (2, 3, 5, (15, 16), (5, 3), (2, 3), (2, 1), (2, 1)),
    (1, 6, 4, (9, 9), (1, 1), (2, 2), (0, 0), (1, 1)),
    (2, 4, 4, (4, 5), (3, 3), (1, 1), (3, 2), (1, 1)),
]


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("n,c,o,hw,k,s,p,d", DIRECT_GEOMS, ids=lambda v: str(v))
def test_conv2d_algo_geometries_vs_reference(be, algo_env, n, c, o, hw, k, s, p, d, algo):
    algo_env(algo)
    mask = make_mask((o, c, *k), "random", 0.4)
    w, x = torch.randn(o, c, *k, dtype=torch.float64), torch.randn(n, c, *hw, dtype=torch.float64)
    conv = ConvParams(s, p, d, 1)
    _check_conv(be, x, w, torch.randn(o, dtype=torch.float64), Pattern(mask), Pattern(_sub_mask(mask)), conv,
                torch.float64)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("n,c,o,hw,k,s,p,d,block,density,empty", BLOCK_CONV, ids=lambda v: str(v))
def test_conv2d_algo_block_vs_reference(be, algo_env, n, c, o, hw, k, s, p, d, block, density, empty, algo):
    algo_env(algo)
    wshape, blk = (o, c, k, k), (block, block)
    mask = make_block_mask(wshape, blk, density, empty_block_rows=empty)
    w, x = torch.randn(wshape), torch.randn(n, c, *hw)
    conv = ConvParams((s, s), (p, p), (d, d), 1)
    pat = pattern_of(mask, "block", blk)
    gblock = mask & make_block_mask(wshape, blk, 0.6)
    _check_conv(be, x, w, torch.randn(o), pat, Pattern(gblock, "block", pat.block_size), conv, torch.float32)


@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2)])
def test_gradcheck_sparse_conv2d_direct(algo_env, stride, dilation):
    algo_env("direct")
    mask = make_mask((5, 3, 3, 3), "random", 0.5)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return sparsekern.sparse_conv2d(x, w, b, mask, None, stride, 1, dilation, 1, backend="cpp")

    assert torch.autograd.gradcheck(f, (x, w, b))


def _conv_passes(be, layout):
    torch.manual_seed(5)
    wshape = (40, 32, 3, 3)
    if layout == "block":
        mask = make_block_mask(wshape, (16, 16), 0.5)
        pat = pattern_of(mask, "block", 16)
    else:
        mask = make_mask(wshape, "random", 0.2)
        pat = Pattern(mask)
    w, x = torch.randn(wshape), torch.randn(5, 32, 18, 17)  # 8 tiles or more, spanning images
    outs = []
    for s in (1, 2):
        conv = ConvParams((s, s), (1, 1), (1, 1), 1)
        y = be.conv2d_fwd(x, w, torch.randn(40), pat, conv)
        dy = torch.randn_like(y)
        outs += [y, be.conv2d_dx(dy, w, pat, tuple(x.shape), conv), be.conv2d_dw(dy, x, pat, wshape, conv)]
    return outs


@pytest.mark.parametrize("layout", ["unstructured", "block"])
def test_conv2d_direct_bit_identical_across_thread_counts(be, algo_env, layout):
    algo_env("direct")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _conv_passes(be, layout)
        torch.set_num_threads(2)
        two = _conv_passes(be, layout)
        again = _conv_passes(be, layout)
    finally:
        torch.set_num_threads(before)
    for a, b, c in zip(one, two, again):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_conv2d_auto_algo_is_valid_and_forced_by_env(be, algo_env):
    shapes = [  # (input, weight, stride): ResNet-18 CIFAR 3x3 layers, a 1x1 and a tiny one
        ([32, 64, 32, 32], [64, 64, 3, 3], 1), ([32, 64, 32, 32], [128, 64, 3, 3], 2),
        ([32, 128, 16, 16], [128, 128, 3, 3], 1), ([32, 256, 8, 8], [256, 256, 3, 3], 1),
        ([32, 512, 4, 4], [512, 512, 3, 3], 1), ([8, 16, 32, 32], [32, 16, 1, 1], 2), ([1, 2, 3, 3], [2, 2, 3, 3], 1),
    ]
    algo_env("auto")
    picked, pats = {}, {}
    for xs, ws, s in shapes:
        pats[tuple(ws)] = Pattern(make_mask(ws, "random", 0.1))
        for op in ("fwd", "dx", "dw"):
            got = cppmod.conv2d_algo(op, xs, ws, s, 1, pattern=pats[tuple(ws)])
            assert got in ("direct", "gemm")
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
    mask = make_mask((6, 4, 3, 3), "random", 0.1)
    pat = Pattern(mask)
    x, w = torch.randn(2, 4, 17, 16), torch.randn(6, 4, 3, 3)
    conv = ConvParams((1, 1), (1, 1), (1, 1), 1)
    auto_y = be.conv2d_fwd(x, w, None, pat, conv)
    algo_env(cppmod.conv2d_algo("fwd", list(x.shape), list(w.shape), 1, 1, pattern=pat))
    assert torch.equal(auto_y, be.conv2d_fwd(x, w, None, pat, conv))
    for forced in ALGOS:
        algo_env(forced)
        assert cppmod.conv2d_algo("dw", [32, 512, 4, 4], [512, 512, 3, 3], 1, 1) == forced
    algo_env("fastest")
    with pytest.raises(RuntimeError, match="SPARSEKERN_CPU_CONV_ALGO"):
        be.conv2d_fwd(x, w, None, pat, conv)
    algo_env("auto")
    with pytest.raises(RuntimeError, match="op: expected"):
        cppmod.conv2d_algo("bwd", [1, 2, 3, 3], [2, 2, 3, 3])


@pytest.mark.parametrize("algo", ALGOS)
def test_conv2d_algo_every_instruction_set(be, algo_env, algo):
    algo_env(algo)
    before = torch.ops.sparsekern.cpu_isa()
    try:
        for isa in [i for i in ("avx512", "avx2", "generic") if _isa_ok(i)]:
            assert cppmod.cpu_isa(isa) == isa
            for s in (1, 2):
                wc = torch.randn(12, 5, 3, 3, dtype=torch.float64)
                cm = make_mask(wc.shape, "random", 0.4)
                conv = ConvParams((s, s), (1, 1), (1, 1), 1)
                x = torch.randn(2, 5, 11, 9, dtype=torch.float64)
                _check_conv(be, x, wc, torch.randn(12, dtype=torch.float64), Pattern(cm), Pattern(cm), conv,
                            torch.float64)
                bm = make_block_mask((32, 16, 3, 3), (16, 16), 0.6)
                _check_conv(be, torch.randn(2, 16, 9, 10), torch.randn(32, 16, 3, 3), None,
                            pattern_of(bm, "block", 16), Pattern(_sub_mask(bm)), conv, torch.float32)
    finally:
        cppmod.cpu_isa(before)
