"""The Triton launchers (BSR and CSR: forward, input gradient, SDDMM weight gradient) against the
reference, on CPU tensors in Triton's interpreter (``interp`` ids; ``TRITON_INTERPRET=1`` is set
by conftest.py when no GPU is present) and, when a GPU is present, compiled on CUDA with larger
shapes (``cuda`` ids, skipped here).

Every output buffer a kernel must overwrite is NaN-filled first, and weights outside the mask are
NaN, so an unwritten element or a read of a pruned weight fails the comparison.
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton", reason="the triton backend needs the triton package (pip install .[triton])")

from sparsekern.formats import Pattern, pattern_of  # noqa: E402
from sparsekern.reference import linear_dw, linear_dx, linear_fwd  # noqa: E402
from sparsekern.testing import assert_close, linear_cases, make_block_mask, make_mask  # noqa: E402

INTERP = bool(triton.knobs.runtime.interpret)
HAS_CUDA = torch.cuda.is_available()

needs_interp = pytest.mark.skipif(
    not INTERP, reason="CPU variant: needs TRITON_INTERPRET=1 (conftest sets it when no GPU is present)"
)
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA or INTERP, reason="CUDA-only variant: needs a CUDA device and compiled (not interpreted) kernels"
)


def _device_params():
    return [pytest.param("cpu", marks=needs_interp, id="interp"), pytest.param("cuda", marks=needs_cuda, id="cuda")]


DTYPES = {
    "cpu": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    from sparsekern.kernels.triton import _launch

    monkeypatch.setattr(_launch, "FILL_OUTPUTS_WITH_NAN", True)
    yield


@pytest.fixture(autouse=True)
def _ieee_fp32():
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(prev)


def check_against_reference(out, ref_fn, args, dtype, what):
    """fp32/fp64: the dtype's tolerance against the reference in the same dtype.  fp16/bf16: the
    kernel's error against an fp32 reference is at most 2x PyTorch's own error in that dtype, with
    a floor of one unit in the last place of the largest output."""
    assert not torch.isnan(out).any(), (
        f"{what}: NaN in the output (an element was not written, or a pruned weight read)"
    )
    if dtype in (torch.float32, torch.float64):
        assert_close(out, ref_fn(*args), msg=f"{what} differs from the reference")
        return
    up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    ref32 = ref_fn(*up)
    own = ref_fn(*args).float()
    err = (out.float() - ref32).abs().max().item() if out.numel() else 0.0
    torch_err = (own - ref32).abs().max().item() if out.numel() else 0.0
    floor = torch.finfo(dtype).eps * max(1.0, ref32.abs().max().item() if out.numel() else 0.0)
    assert err <= 2 * torch_err + floor, f"{what}: error {err:.3g} > 2 x torch's {torch_err:.3g} + {floor:.3g}"


def _nan_outside(weight, mask):
    return weight.masked_fill(~mask, float("nan"))


# ------------------------------------------------------------------------------------------
# BSR
# ------------------------------------------------------------------------------------------

# (N, K, M, block (bo, bk), tile density, kind); sizes one off a block multiple, empty block rows,
# density 0 and 1, rectangular blocks
BSR_CASES = {
    "cpu": [
        (5, 47, 33, (16, 16), 0.5, "random"),
        (7, 64, 48, (32, 16), 0.6, "empty_block_rows"),
        (3, 40, 70, (16, 32), 0.5, "random"),
        (4, 32, 32, (16, 16), 0.0, "random"),
        (6, 33, 17, (16, 16), 1.0, "random"),
        (20, 64, 48, (32, 32), 0.5, "random"),
    ],
    "cuda": [
        (257, 1000, 771, (64, 64), 0.3, "random"),
        (1024, 768, 3072, (128, 128), 0.1, "random"),
        (333, 511, 129, (16, 64), 0.5, "empty_block_rows"),
        (64, 256, 256, (32, 32), 0.0, "random"),
        (129, 200, 300, (16, 16), 1.0, "random"),
        (512, 1024, 1024, (64, 32), 0.1, "empty_block_rows"),
    ],
}


def _bsr_case_id(c):
    n, k, m, (bo, bk), d, kind = c
    return f"N{n}-K{k}-M{m}-b{bo}x{bk}-d{d}-{kind}"


def _bsr_params():
    out = []
    for dev in _device_params():
        for case in BSR_CASES[dev.values[0]]:
            for dtype in DTYPES[dev.values[0]]:
                out.append(
                    pytest.param(
                        dev.values[0],
                        case,
                        dtype,
                        marks=dev.marks,
                        id=f"{dev.id}-{_bsr_case_id(case)}-{str(dtype)[6:]}",
                    )
                )
    return out


def _bsr_inputs(device, case, dtype):
    n, k, m, block, density, kind = case
    mask = make_block_mask((m, k), block, density, empty_block_rows=kind == "empty_block_rows").to(device)
    tiles_g = torch.rand(math.ceil(m / block[0]), math.ceil(k / block[1])) < 0.6
    from sparsekern.formats import expand_block_mask

    gmask = mask & expand_block_mask(tiles_g, block, (m, k)).to(device)  # a block subset of the weight mask
    w = torch.randn(m, k, dtype=dtype, device=device)
    x = torch.randn(n, k, dtype=dtype, device=device)
    dy = torch.randn(n, m, dtype=dtype, device=device)
    b = torch.randn(m, dtype=dtype, device=device)
    return mask, gmask, w, x, dy, b


@pytest.mark.parametrize("device,case,dtype", _bsr_params())
def test_bsr_linear_fwd_dx_dw_match_reference(device, case, dtype):
    from sparsekern.kernels.triton.bsr import bsr_linear_dw, bsr_linear_dx, bsr_linear_fwd

    mask, gmask, w, x, dy, b = _bsr_inputs(device, case, dtype)
    block = case[3]
    meta = Pattern(mask, "block", block).bsr()
    gmeta = Pattern(gmask, "block", block).bsr()
    wn = _nan_outside(w, mask)

    y = bsr_linear_fwd(x, wn, b, meta)
    check_against_reference(y, linear_fwd, (x, w, b, mask), dtype, "forward")
    y0 = bsr_linear_fwd(x, wn, None, meta)
    check_against_reference(y0, linear_fwd, (x, w, None, mask), dtype, "forward without bias")
    # empty block rows are written: bias alone / exact zeros
    empty_rows = ~mask.any(1)
    assert torch.equal(y[:, empty_rows], b[empty_rows].expand(x.shape[0], -1))
    assert (y0[:, empty_rows] == 0).all()

    dx = bsr_linear_dx(dy, wn, meta)
    check_against_reference(dx, linear_dx, (dy, w, mask), dtype, "input gradient")
    assert (dx[:, ~mask.any(0)] == 0).all()

    dw = bsr_linear_dw(dy, x, gmeta)
    check_against_reference(dw, linear_dw, (dy, x, gmask), dtype, "weight gradient")
    assert (dw[~gmask] == 0).all(), "weight gradient must be exactly zero outside the gradient mask"


# Explicit tile configurations: sub-tiles of 64/128 blocks along both sides, partial swizzle groups.
BSR_CONFIGS = [
    (
        (50, 130, 70, (64, 64)),
        dict(BLOCK_N=16, BLOCK_R=16, BLOCK_C=32, GROUP_N=3),
        dict(BLOCK_M=16, BLOCK_K=32, BLOCK_N=16),
    ),
    (
        (9, 129, 131, (128, 128)),
        dict(BLOCK_N=16, BLOCK_R=64, BLOCK_C=32, GROUP_N=1),
        dict(BLOCK_M=64, BLOCK_K=32, BLOCK_N=16),
    ),
    (
        (37, 100, 66, (32, 64)),
        dict(BLOCK_N=16, BLOCK_R=32, BLOCK_C=16, GROUP_N=2),
        dict(BLOCK_M=32, BLOCK_K=16, BLOCK_N=32),
    ),
]


@needs_interp
@pytest.mark.parametrize(
    "shape,fwd_cfg,dw_cfg",
    BSR_CONFIGS,
    ids=[f"N{s[0]}-K{s[1]}-M{s[2]}-b{s[3][0]}x{s[3][1]}" for s, _, _ in BSR_CONFIGS],
)
def test_bsr_spmm_sddmm_subtile_configs_match_reference(shape, fwd_cfg, dw_cfg):
    from sparsekern.kernels.triton.bsr import bsr_linear_dw, bsr_linear_dx, bsr_linear_fwd

    n, k, m, block = shape
    mask = make_block_mask((m, k), block, 0.7)
    mask[: block[0]] = False  # an empty block row
    w, x, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(n, m)
    meta = Pattern(mask, "block", block).bsr()
    wn = _nan_outside(w, mask)
    assert_close(bsr_linear_fwd(x, wn, None, meta, config=fwd_cfg), linear_fwd(x, w, None, mask))
    bwd_cfg = dict(fwd_cfg, BLOCK_R=fwd_cfg["BLOCK_C"], BLOCK_C=fwd_cfg["BLOCK_R"])
    assert_close(bsr_linear_dx(dy, wn, meta, config=bwd_cfg), linear_dx(dy, w, mask))
    assert_close(bsr_linear_dw(dy, x, meta, config=dw_cfg), linear_dw(dy, x, mask))


@needs_interp
def test_bsr_block_rows_run_heaviest_first_and_orders_are_cached():
    from sparsekern.kernels.triton.bsr import walk_orders

    mask = make_block_mask((64, 80), (16, 16), 0.5)
    meta = pattern_of(mask, "block", 16).bsr().blocks
    orders = walk_orders(meta)
    lengths = (meta.crow_indices[1:] - meta.crow_indices[:-1])[orders["row_order"].long()]
    assert (lengths[:-1] >= lengths[1:]).all()
    clen = (meta.ccol_indices[1:] - meta.ccol_indices[:-1])[orders["col_order"].long()]
    assert (clen[:-1] >= clen[1:]).all()
    assert torch.equal(orders["row_ids"].long(), meta.row_ids())
    assert walk_orders(meta) is orders  # cached with the metadata
    mask[:16] = True  # a mask change rebuilds the metadata, and with it the orders
    assert walk_orders(pattern_of(mask, "block", 16).bsr().blocks) is not orders


# ------------------------------------------------------------------------------------------
# CSR
# ------------------------------------------------------------------------------------------

CSR_CASES = {
    "cpu": [(c.batch, c.in_features, c.out_features, c.kind, c.density) for c in linear_cases()],
    "cuda": [
        (257, 1000, 771, "random", 0.1),
        (1024, 768, 3072, "random", 0.05),
        (333, 511, 129, "empty_rows", 0.3),
        (64, 256, 256, "empty_cols", 0.3),
        (129, 200, 300, "dense", 1.0),
        (64, 256, 256, "empty", 0.0),
        (17, 33, 15, "single", 0.0),
    ],
}
# the half dtypes on a subset, so the interpreter run stays short
CSR_HALF_KINDS = ("random", "empty_rows", "single")


def _csr_params():
    out = []
    for dev in _device_params():
        d = dev.values[0]
        for case in CSR_CASES[d]:
            for dtype in DTYPES[d]:
                if d == "cpu" and dtype in (torch.float16, torch.bfloat16) and case[3] not in CSR_HALF_KINDS:
                    continue
                n, k, m, kind, dens = case
                cid = f"{dev.id}-N{n}-K{k}-M{m}-{kind}-d{dens}-{str(dtype)[6:]}"
                out.append(pytest.param(d, case, dtype, marks=dev.marks, id=cid))
    return out


@pytest.mark.parametrize("device,case,dtype", _csr_params())
def test_csr_linear_fwd_dx_dw_match_reference(device, case, dtype):
    from sparsekern.kernels.triton.csr import csr_linear_dw, csr_linear_dx, csr_linear_fwd

    n, k, m, kind, density = case
    mask = make_mask((m, k), kind, density).to(device)
    gmask = mask & (torch.rand(m, k) < 0.5).to(device)  # G != M (unstructured subset)
    w = torch.randn(m, k, dtype=dtype, device=device)
    x = torch.randn(n, k, dtype=dtype, device=device)
    dy = torch.randn(n, m, dtype=dtype, device=device)
    b = torch.randn(m, dtype=dtype, device=device)
    meta, gmeta = Pattern(mask).csr(), Pattern(gmask).csr()
    wn = _nan_outside(w, mask)

    y = csr_linear_fwd(x, wn, b, meta)
    check_against_reference(y, linear_fwd, (x, w, b, mask), dtype, "forward")
    empty_rows = ~mask.any(1)
    assert torch.equal(y[:, empty_rows], b[empty_rows].expand(n, -1))

    dx = csr_linear_dx(dy, wn, meta)
    check_against_reference(dx, linear_dx, (dy, w, mask), dtype, "input gradient")
    assert (dx[:, ~mask.any(0)] == 0).all()

    for g, gm in ((mask, meta), (gmask, gmeta)):
        dw = csr_linear_dw(dy, x, gm)
        check_against_reference(dw, linear_dw, (dy, x, g), dtype, "weight gradient")
        assert (dw[~g] == 0).all(), "weight gradient must be exactly zero outside the gradient mask"


def _skewed_mask(m, k, device="cpu"):
    """Rows of very different length: row i keeps about i/m of its entries (row 0 none, last all)."""
    keep = torch.arange(m, dtype=torch.float32)[:, None] / max(m - 1, 1)
    mask = torch.rand(m, k) < keep
    return mask[torch.randperm(m)].to(device)  # lengths in no particular order


@pytest.mark.parametrize(
    "device,shape",
    [
        pytest.param("cpu", (9, 45, 37), marks=needs_interp, id="interp-N9-K45-M37"),
        pytest.param("cuda", (1000, 2048, 1500), marks=needs_cuda, id="cuda-N1000-K2048-M1500"),
    ],
)
def test_csr_linear_rows_of_very_different_length(device, shape):
    from sparsekern.kernels.triton.bsr import walk_orders
    from sparsekern.kernels.triton.csr import csr_linear_dw, csr_linear_dx, csr_linear_fwd

    n, k, m = shape
    mask = _skewed_mask(m, k, device)
    w, x, dy = (torch.randn(*s, device=device) for s in ((m, k), (n, k), (n, m)))
    meta = Pattern(mask).csr()
    lengths = (meta.crow_indices[1:] - meta.crow_indices[:-1]).long()
    assert lengths.min() == 0 and lengths.max() == k  # as skewed as it gets
    order = walk_orders(meta)["row_order"].long()
    assert (lengths[order][:-1] >= lengths[order][1:]).all(), "rows must be scheduled longest first"
    wn = _nan_outside(w, mask)
    assert_close(csr_linear_fwd(x, wn, None, meta), linear_fwd(x, w, None, mask))
    assert_close(csr_linear_dx(dy, wn, meta), linear_dx(dy, w, mask))
    assert_close(csr_linear_dw(dy, x, meta), linear_dw(dy, x, mask))


@needs_interp
@pytest.mark.parametrize(
    "spmm_cfg,sddmm_cfg",
    [
        (dict(BLOCK_R=4, BLOCK_N=16, UNROLL=3), dict(BLOCK_Z=16, BLOCK_N=16)),
        (dict(BLOCK_R=2, BLOCK_N=32, UNROLL=1), dict(BLOCK_Z=128, BLOCK_N=64)),
    ],
    ids=["R4-N16-U3", "R2-N32-U1"],
)
def test_csr_spmm_sddmm_configs_match_reference(spmm_cfg, sddmm_cfg):
    """An unroll that does not divide the row lengths; more entries per program than exist."""
    from sparsekern.kernels.triton.csr import csr_linear_dw, csr_linear_dx, csr_linear_fwd

    n, k, m = 19, 23, 13
    mask = _skewed_mask(m, k)
    w, x, dy, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n, m), torch.randn(m)
    meta = Pattern(mask).csr()
    wn = _nan_outside(w, mask)
    assert_close(csr_linear_fwd(x, wn, b, meta, config=spmm_cfg), linear_fwd(x, w, b, mask))
    assert_close(csr_linear_dx(dy, wn, meta, config=spmm_cfg), linear_dx(dy, w, mask))
    assert_close(csr_linear_dw(dy, x, meta, config=sddmm_cfg), linear_dw(dy, x, mask))


# ------------------------------------------------------------------------------------------
# argument checks and precision
# ------------------------------------------------------------------------------------------


@needs_interp
def test_launchers_reject_bad_arguments_naming_them():
    from sparsekern.kernels.triton.bsr import bsr_linear_dw, bsr_linear_fwd
    from sparsekern.kernels.triton.csr import csr_linear_dx, csr_linear_fwd

    mask = make_block_mask((32, 48), (16, 16), 0.5)
    bmeta = Pattern(mask, "block", (16, 16)).bsr()
    cmeta = Pattern(mask).csr()
    w, x = torch.randn(32, 48), torch.randn(4, 48)
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        bsr_linear_fwd(x.double(), w, None, bmeta)
    with pytest.raises(ValueError, match="x: expected a contiguous tensor"):
        bsr_linear_fwd(torch.randn(48, 4).t(), w, None, bmeta)
    with pytest.raises(ValueError, match=r"x: expected shape \[N, 48\]"):
        csr_linear_fwd(torch.randn(4, 47), w, None, cmeta)
    with pytest.raises(TypeError, match="meta: expected a BSRMeta"):
        bsr_linear_fwd(x, w, None, cmeta)
    with pytest.raises(TypeError, match="meta: expected a CSRMeta"):
        csr_linear_fwd(x, w, None, bmeta)
    with pytest.raises(ValueError, match=r"meta: describes a \(32, 48\) matrix"):
        csr_linear_dx(torch.randn(4, 16), torch.randn(16, 48), cmeta)
    with pytest.raises(TypeError, match="weight: expected float32, float16 or bfloat16"):
        bsr_linear_fwd(x.int(), w.int(), None, bmeta)
    with pytest.raises(ValueError, match=r"dy: expected 4 rows"):
        bsr_linear_dw(torch.randn(5, 32), x, bmeta)
    with pytest.raises(ValueError, match="bias: expected a 1-D tensor"):
        bsr_linear_fwd(x, w, torch.randn(32, 1), bmeta)


@needs_interp
def test_fp32_precision_is_ieee_unless_tf32_is_allowed():
    from sparsekern.kernels.triton._launch import resolve_precision

    assert resolve_precision(torch.float32, None) == "ieee"
    assert resolve_precision(torch.float32, "tf32") == "tf32"
    assert resolve_precision(torch.bfloat16, "tf32") == "ieee"  # half dtypes multiply natively
    torch.set_float32_matmul_precision("high")
    assert resolve_precision(torch.float32, None) == "tf32"
    with pytest.raises(ValueError, match="precision: expected one of"):
        resolve_precision(torch.float32, "fp8")


@needs_interp
def test_interpreter_tuning_is_a_single_fixed_config():
    """Under the interpreter nothing is autotuned (each launch is slow and timing meaningless)."""
    from sparsekern.kernels.triton import bsr, csr

    for tuned in (bsr._bsr_spmm_tuned, bsr._bsr_sddmm_tuned, csr._csr_spmm_tuned, csr._csr_sddmm_tuned):
        assert tuned._tuned is None and tuned.interpret_config
