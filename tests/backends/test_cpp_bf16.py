"""The bf16 paths of the ``cpp`` kernels (``cpu_bf16``, ``SPARSEKERN_CPU_BF16``): each path this
CPU offers, forced in turn, against the fp32 reference of the bf16 operands, with odd shapes,
empty block rows and densities 0 and 1; deterministic for any thread count.  On a CPU without
AVX512-BF16 the ``avx512_bf16`` cases check that the request is refused and run the widening
fallback instead (the ISA report says so), so nothing is skipped for a missing feature."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sparsekern.kernels import cpu as cppmod
from tests.support import requires_cpp

pytestmark = requires_cpp

BF16 = torch.bfloat16
PATHS = ("avx512_bf16", "widen")
TOL = dict(atol=5e-2, rtol=2e-2)  # bf16 output rounding on fp32 accumulation
ops = torch.ops.sparsekern


def _offered(path: str) -> bool:
    return path == "widen" or "avx512_bf16" in cppmod.cpu_features().split(",")


@pytest.fixture(params=PATHS)
def path(request):
    """Force one bf16 path for the test; where the CPU lacks it, check the refusal and run "widen"."""
    before = cppmod.cpu_bf16()
    if _offered(request.param):
        assert cppmod.cpu_bf16(request.param) == request.param
    else:
        with pytest.raises(RuntimeError, match="bf16 path"):
            cppmod.cpu_bf16(request.param)
        assert cppmod.cpu_bf16("widen") == "widen"
    yield cppmod.cpu_bf16()
    cppmod.cpu_bf16(before)


def _grid_csr(grid: torch.Tensor):
    """CSR (int32) of a boolean block grid, and of its transpose (the dx metadata)."""

    def csr(g):
        counts = g.sum(1).to(torch.int32)
        crow = torch.zeros(g.shape[0] + 1, dtype=torch.int32)
        crow[1:] = counts.cumsum(0)
        return crow, g.nonzero()[:, 1].to(torch.int32).contiguous()

    return csr(grid), csr(grid.t())


def _problem(M, K, N, bo, bk, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.rand(-(-M // bo), -(-K // bk), generator=g) < density
    if grid.shape[0] > 2 and 0 < density < 1:
        grid[1] = False  # an empty block row (and, in W^T, a missing block column)
    mask = grid.repeat_interleave(bo, 0).repeat_interleave(bk, 1)[:M, :K]
    w = (torch.randn(M, K, generator=g) * mask).to(BF16)
    x = torch.randn(N, K, generator=g).to(BF16)
    dy = torch.randn(N, M, generator=g).to(BF16)
    return grid, mask, w, x, dy


def _passes(M, K, N, bo, bk, density, seed=0):
    grid, mask, w, x, dy = _problem(M, K, N, bo, bk, density, seed)
    (crow, col), (ccol, row) = _grid_csr(grid)
    b = torch.randn(M, generator=torch.Generator().manual_seed(seed + 1)).to(BF16)
    y = ops.linear_fwd(x, w, b, crow, col, [bo, bk], None, None, 0)
    dx = ops.linear_dx(dy, w, ccol, row, [bo, bk], None, None, 0)
    dw = ops.linear_dw(dy, x, crow, col, [bo, bk], None, None, 0)
    xf, wf, dyf = x.float(), w.float(), dy.float()
    refs = (xf @ wf.t() + b.float(), dyf @ wf, (dyf.t() @ xf) * mask)
    return (y, dx, dw), refs


CASES = [
    # M, K, N, bo, bk, density
    (64, 64, 64, 16, 16, 0.5),
    (50, 70, 37, 16, 16, 0.6),  # blocks clipped at both edges, odd K, a partial batch tile
    (96, 33, 130, 32, 32, 0.5),  # odd K inside one clipped block column
    (128, 128, 5, 64, 64, 0.5),
    (40, 48, 17, 8, 2, 0.4),
    (31, 45, 9, 1, 1, 0.3),  # unstructured: rows of odd and even counts, one partial lane tile
    (70, 300, 150, 1, 1, 0.1),  # unstructured: 64-wide lane tiles (x 3), the 256-wide dW tile
    (40, 257, 200, 1, 1, 0.5),  # unstructured: 128-wide lane tiles, a partial second tile
    (45, 90, 96, 1, 1, 0.2),  # unstructured: the 96-wide lane and dW tiles
    (45, 90, 80, 1, 1, 0.2),  # unstructured: 96-wide tiles with 16 idle columns
    (33, 64, 70, 1, 1, 1.0),  # unstructured at density 1
    (33, 64, 70, 1, 1, 0.0),  # unstructured, empty
    (24, 45, 9, 4, 3, 0.5),  # odd bk: also widened
    (48, 64, 20, 16, 16, 0.0),
    (48, 64, 20, 16, 16, 1.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}-K{}-N{}-b{}x{}-d{}".format(*c))
def test_linear_bf16_matches_fp32_reference(path, case):
    got, refs = _passes(*case)
    for g, r, name in zip(got, refs, ("y", "dx", "dw")):
        assert g.dtype == BF16, name
        torch.testing.assert_close(g.float(), r, **TOL, msg=lambda m, name=name: f"{name} on {path}: {m}")


@pytest.mark.parametrize(
    "case", [CASES[1], CASES[3], CASES[5], CASES[7]], ids=["block16", "block64", "unstr", "unstr128"]
)
def test_bf16_paths_deterministic_across_threads(path, case):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = _passes(*case)
        torch.set_num_threads(2)
        two, _ = _passes(*case)
        again, _ = _passes(*case)
    finally:
        torch.set_num_threads(before)
    for a, b, c in zip(one, two, again):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_odd_blocks_take_the_widening_panels():
    """Block patterns with an odd bk run on the widening panels on both paths (bit-identical)."""
    before = cppmod.cpu_bf16()
    try:
        for case in [c for c in CASES if c[3] > 1 and c[4] % 2 == 1]:
            runs = []
            for p in [p for p in PATHS if _offered(p)]:
                cppmod.cpu_bf16(p)
                runs.append(_passes(*case)[0])
            for other in runs[1:]:
                assert all(torch.equal(a, b) for a, b in zip(runs[0], other))
    finally:
        cppmod.cpu_bf16(before)


def test_the_forced_path_is_the_one_that_runs(path):
    """vdpbf16ps reads bf16 subnormals as zero, the widening path keeps them: the output shows
    which kernel ran, so the report (cpu_bf16) is checked against the arithmetic."""
    w = torch.ones(16, 16, dtype=BF16)
    x = torch.full((4, 16), 1e-39, dtype=BF16)  # a bf16 subnormal
    crow, col = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    y = ops.linear_fwd(x, w, None, crow, col, [16, 16], None, None, 0).float()
    if path == "avx512_bf16":
        assert torch.all(y == 0)
    else:
        torch.testing.assert_close(y, torch.full_like(y, 16 * x[0, 0].item()), atol=0, rtol=1e-2)


@pytest.mark.parametrize("layout", ["unstructured", "block"])
def test_every_pass_runs_on_the_forced_path(path, layout):
    """The same subnormal check for all three passes, unstructured and block: the input gradient
    and the weight gradient run on the path the report names too."""
    b = 1 if layout == "unstructured" else 16
    M = K = N = 16
    grid = torch.ones(M // b, K // b, dtype=torch.bool)
    (crow, col), (ccol, row) = _grid_csr(grid)
    tiny = torch.full((N, K), 1e-39, dtype=BF16)  # bf16 subnormals
    one_w, one_dy = torch.ones(M, K, dtype=BF16), torch.ones(N, M, dtype=BF16)
    outs = (
        ops.linear_fwd(tiny, one_w, None, crow, col, [b, b], None, None, 0),
        ops.linear_dx(one_dy, tiny, ccol, row, [b, b], None, None, 0),  # the weight subnormal
        ops.linear_dw(one_dy, tiny, crow, col, [b, b], None, None, 0),
    )
    for name, y in zip(("y", "dx", "dw"), outs):
        if path == "avx512_bf16":
            assert torch.all(y.float() == 0), name
        else:
            assert torch.all(y.float() > 0), name


def test_report_and_default_path():
    feats = cppmod.cpu_features()
    assert set(filter(None, feats.split(","))) <= {"avx512_bf16", "amx_bf16"}
    with pytest.raises(RuntimeError, match="bf16 path"):
        cppmod.cpu_bf16("sse9")
    from sparsekern import env

    rep = env.report()["cpu_bf16"]
    assert rep["features"] == feats and rep["path"] in PATHS


@pytest.mark.parametrize("value", ["widen", "avx512_bf16", "bogus"])
def test_env_var_sets_the_first_choice(value):
    code = "from sparsekern.kernels import cpu; print(cpu.cpu_bf16(), cpu.cpu_features())"
    env = dict(os.environ, SPARSEKERN_CPU_BF16=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    got, _, feats = out.stdout.strip().partition(" ")
    best = "avx512_bf16" if "avx512_bf16" in feats.split(",") else "widen"
    assert got == (value if value == "widen" else best)


def _conv_passes(N, C, co, H, k, stride, pad, bo, bk, density, seed=0):
    """The three conv2d ops in bf16 and their fp32 references on the same bf16 operands (the
    weight [C_out, C, k, k] viewed as [C_out, C * k * k] carries the pattern)."""
    g = torch.Generator().manual_seed(seed)
    Kc = C * k * k
    grid = torch.rand(-(-co // bo), -(-Kc // bk), generator=g) < density
    if grid.shape[0] > 2 and 0 < density < 1:
        grid[1] = False  # an output channel with no weights
    mask2 = grid.repeat_interleave(bo, 0).repeat_interleave(bk, 1)[:co, :Kc]
    mask = mask2.reshape(co, C, k, k)
    w = (torch.randn(co, C, k, k, generator=g) * mask).to(BF16)
    x = torch.randn(N, C, H, H, generator=g).to(BF16)
    b = torch.randn(co, generator=g).to(BF16)
    (crow, col), (ccol, row) = _grid_csr(grid)
    yref = torch.nn.functional.conv2d(x.float(), w.float(), b.float(), stride, pad)
    dy = torch.randn(yref.shape, generator=g).to(BF16)
    blk, st, pd, dl = [bo, bk], [stride, stride], [pad, pad], [1, 1]
    y = ops.conv2d_fwd(x, w, b, crow, col, blk, st, pd, dl)
    dx = ops.conv2d_dx(dy, w, ccol, row, blk, list(x.shape), st, pd, dl)
    dw = ops.conv2d_dw(dy, x, crow, col, blk, list(w.shape), st, pd, dl)
    dwv = ops.conv2d_dw_values(dy, x, crow, col, blk, list(w.shape), st, pd, dl)
    xf = x.float().requires_grad_()
    wf = w.float().requires_grad_()
    torch.nn.functional.conv2d(xf, wf, None, stride, pad).backward(dy.float())
    refs = (yref, xf.grad, wf.grad * mask)
    return (y, dx, dw), refs, (dwv, mask)


CONV_CASES = [
    # N, C, co, H, k, stride, pad, bo, bk, density
    (2, 16, 24, 18, 3, 1, 1, 1, 1, 0.1),  # unstructured, 18x18 planes, rows of odd and even counts
    (3, 8, 20, 17, 3, 2, 1, 1, 1, 0.3),  # stride 2: four phase planes, odd plane size
    (2, 12, 16, 16, 3, 1, 0, 1, 1, 1.0),  # density 1, no padding
    (2, 12, 16, 16, 3, 1, 1, 1, 1, 0.0),  # empty
    (2, 16, 32, 16, 3, 1, 1, 16, 16, 0.3),  # block 16
    (1, 5, 7, 20, 5, 1, 2, 1, 1, 0.2),  # 5x5 taps, odd channels
    # 4x4 outputs: whole planes by word permutes (Lane16Map); an odd batch leaves half a pair
    (3, 20, 24, 4, 3, 1, 1, 1, 1, 0.3),
    (2, 9, 11, 4, 5, 1, 2, 1, 1, 0.4),  # 5x5 taps on a 4x4 plane: most taps read padding
    (3, 6, 10, 5, 2, 1, 0, 1, 1, 0.5),  # 5x5 input planes (25 entries): permuted im2col, general col2im
    (2, 16, 24, 8, 3, 2, 1, 1, 1, 0.2),  # 8x8 -> 4x4 at stride 2: planes too large for the permutes
    (2, 10, 12, 8, 1, 2, 0, 1, 1, 0.5),  # 1x1 at stride 2
    (2, 24, 8, 3, 3, 1, 1, 1, 1, 0.3),  # 3x3 outputs (9 per image)
    # stride 1, output plane = input plane: GEMM tiles by masked plane loads (LaneShiftMap)
    (3, 16, 24, 8, 3, 1, 1, 1, 1, 0.3),  # 8x8: whole images per tile (the adjoint by loads too)
    (2, 9, 12, 8, 5, 1, 2, 1, 1, 0.5),  # 5x5 taps
    (2, 16, 20, 16, 3, 1, 1, 1, 1, 0.2),  # 16x16: half an image per tile, general col2im
    (3, 20, 16, 7, 3, 1, 1, 1, 1, 0.3),  # 7x7 (MNIST's third stage): groups of 32 run into the next image
    (5, 6, 8, 6, 3, 1, 1, 1, 1, 0.5),  # 6x6: 36 entries, the last image's group cut by the batch end
    (2, 8, 10, 14, 3, 1, 1, 1, 1, 0.3),  # 14x14
]


@pytest.mark.parametrize("algo", ["direct", "gemm"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "N{}-C{}-co{}-H{}-k{}-s{}-p{}-b{}x{}-d{}".format(*c))
def test_conv2d_bf16_matches_fp32_reference(path, case, algo, monkeypatch):
    monkeypatch.setenv("SPARSEKERN_CPU_CONV_ALGO", algo)
    got, refs, (dwv, mask) = _conv_passes(*case)
    for g, r, name in zip(got, refs, ("y", "dx", "dw")):
        assert g.dtype == BF16, name
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(
            g.float() / scale, r / scale, **TOL, msg=lambda m, name=name: f"{name} on {path}/{algo}: {m}"
        )
    # the compact values are the dense gradient's entries on the pattern, bit for bit
    assert dwv.dtype == BF16
    assert torch.equal(dwv, got[2][mask])


@pytest.mark.parametrize("algo", ["direct", "gemm"])
@pytest.mark.parametrize(
    "case",
    [CONV_CASES[0], CONV_CASES[1], CONV_CASES[4], CONV_CASES[6], CONV_CASES[12], CONV_CASES[15]],
    ids=["s1", "s2", "block16", "4x4", "8x8", "7x7"],
)
def test_conv2d_bf16_deterministic_across_threads(path, case, algo, monkeypatch):
    monkeypatch.setenv("SPARSEKERN_CPU_CONV_ALGO", algo)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _, _ = _conv_passes(*case)
        torch.set_num_threads(2)
        two, _, _ = _conv_passes(*case)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("algo,H", [("direct", 16), ("gemm", 16), ("gemm", 4)])
def test_conv2d_bf16_runs_on_the_forced_path(path, algo, H, monkeypatch):
    """The subnormal check on both conv algorithms (4x4: the permuted small-plane tiles):
    vdpbf16ps reads bf16 subnormals as zero, the widening path keeps them."""
    monkeypatch.setenv("SPARSEKERN_CPU_CONV_ALGO", algo)
    C = co = 8
    grid = torch.ones(co, C * 9, dtype=torch.bool)
    (crow, col), (ccol, row) = _grid_csr(grid)
    tiny = torch.full((1, C, H, H), 1e-39, dtype=BF16)
    w_tiny = torch.full((co, C, 3, 3), 1e-39, dtype=BF16)
    ones_w, ones_dy = torch.ones(co, C, 3, 3, dtype=BF16), torch.ones(1, co, H, H, dtype=BF16)
    blk, st, pd, dl = [1, 1], [1, 1], [1, 1], [1, 1]
    outs = (
        ops.conv2d_fwd(tiny, ones_w, None, crow, col, blk, st, pd, dl),
        ops.conv2d_dx(ones_dy, w_tiny, ccol, row, blk, [1, C, H, H], st, pd, dl),
        ops.conv2d_dw(ones_dy, tiny, crow, col, blk, [co, C, 3, 3], st, pd, dl),
    )
    for name, y in zip(("y", "dx", "dw"), outs):
        if path == "avx512_bf16":
            assert torch.all(y.float() == 0), name
        else:
            assert torch.all(y.float() > 0), name


def test_conv2d_algo_reports_the_bf16_rule(path, monkeypatch):
    """The bf16 rule on avx512_bf16 against fp32's (which the widening path follows): same-size
    stride-1 planes up to 16x16 run the bf16 GEMM forward and dW (8x8 also dx), other 8x8 outputs
    of short im2col rows run direct, 4x4 outputs GEMM for both, wide 8x8 layers and the strided
    input gradient the bf16 GEMM."""
    monkeypatch.delenv("SPARSEKERN_CPU_CONV_ALGO", raising=False)
    from sparsekern import formats

    w_shape = [80, 80, 3, 3]
    mask = torch.rand(80, 80, 3, 3, generator=torch.Generator().manual_seed(0)) < 0.1
    pat = formats.pattern_of(mask, "unstructured", None)
    for op in ("fwd", "dx", "dw"):
        # 8x8 at stride 1, same size: the plane-load GEMM tiles on avx512_bf16 (widened GEMM otherwise)
        assert cppmod.conv2d_algo(op, [32, 80, 8, 8], w_shape, 1, 1, pattern=pat, dtype=BF16) == "gemm", op
        assert cppmod.conv2d_algo(op, [32, 80, 8, 8], w_shape, 1, 1, pattern=pat) == "gemm", op
        # 8x8 outputs of 10x10 planes (no padding): the direct kernels on avx512_bf16
        valid = cppmod.conv2d_algo(op, [32, 80, 10, 10], w_shape, 1, 0, pattern=pat, dtype=BF16)
        assert valid == ("direct" if path == "avx512_bf16" else "gemm"), op
        # 32x32: direct for both
        assert cppmod.conv2d_algo(op, [32, 80, 32, 32], w_shape, 1, 1, pattern=pat, dtype=BF16) == "direct", op
    mid = [
        cppmod.conv2d_algo(op, [32, 80, 16, 16], w_shape, 1, 1, pattern=pat, dtype=BF16) for op in ("fwd", "dx", "dw")
    ]
    assert mid == (["gemm", "direct", "gemm"] if path == "avx512_bf16" else ["direct"] * 3)
    for op in ("fwd", "dx", "dw"):
        assert cppmod.conv2d_algo(op, [32, 80, 4, 4], w_shape, 1, 1, pattern=pat, dtype=BF16) == "gemm", op

    def sparse(*shape):
        return formats.pattern_of(
            torch.rand(*shape, generator=torch.Generator().manual_seed(1)) < 0.1, "unstructured", None
        )

    wide, down = sparse(256, 256, 3, 3), sparse(128, 64, 3, 3)
    for op in ("fwd", "dx", "dw"):
        got = cppmod.conv2d_algo(op, [32, 256, 8, 8], [256, 256, 3, 3], 1, 1, pattern=wide, dtype=BF16)
        assert got == "gemm", op
    strided = [
        cppmod.conv2d_algo(op, [32, 64, 32, 32], [128, 64, 3, 3], 2, 1, pattern=down, dtype=BF16)
        for op in ("fwd", "dx", "dw")
    ]
    assert strided == (["direct", "gemm", "direct"] if path == "avx512_bf16" else ["direct"] * 3)


def test_bf16_96_row_tile_same_bits_as_the_128_row_tile(path):
    """96 rows take the 96-wide lane and dW tiles, 128 rows the 128-wide ones: y and dx rows equal
    bit for bit, and dW of the 96 rows equals dW with 32 zero rows appended."""
    grid, mask, w, x, dy = _problem(60, 200, 128, 1, 1, 0.1, seed=3)
    x[96:], dy[96:] = 0, 0
    (crow, col), (ccol, row) = _grid_csr(grid)

    def run(n):
        xs, dys = x[:n].contiguous(), dy[:n].contiguous()
        return (
            ops.linear_fwd(xs, w, None, crow, col, [1, 1], None, None, 0),
            ops.linear_dx(dys, w, ccol, row, [1, 1], None, None, 0),
            ops.linear_dw(dys, xs, crow, col, [1, 1], None, None, 0),
        )

    (y96, dx96, dw96), (y128, dx128, dw128) = run(96), run(128)
    assert torch.equal(y96, y128[:96]) and torch.equal(dx96, dx128[:96]) and torch.equal(dw96, dw128)
    # the float32 master weight under autocast (read and rounded entry by entry) as well
    y96m = ops.linear_fwd(x[:96].contiguous(), w.float(), None, crow, col, [1, 1], None, None, 0)
    assert torch.equal(y96m, y96)
