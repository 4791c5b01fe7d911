"""Memory rules (issue 20, item 7): no weight-sized temporaries where none are needed.

Allocations are watched with a ``TorchDispatchMode`` that records the size of every tensor an op
returns (C++ scratch that never becomes a tensor is not seen), so the assertions are exact and
independent of the allocator; RSS figures come from ``benchmarks/tools/mem_train.py``.
"""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sparsekern as sk
from sparsekern import choice
from sparsekern import reference as ref


class _Allocs(TorchDispatchMode):
    """Storage bytes of every tensor returned by an op (views of an input are not counted)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = {a.untyped_storage().data_ptr() for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor) and o.device.type == "cpu" and o.untyped_storage().data_ptr() not in ins:
                self.sizes.append(o.untyped_storage().nbytes())
        return out


@pytest.fixture
def small_chunk(monkeypatch):
    monkeypatch.setattr(choice, "CHUNK", 64)
    return 64


def _case(out_f=37, in_f=29, n=6, density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(out_f, in_f, generator=g) < density
    gm = m & (torch.rand(out_f, in_f, generator=g) < 0.7)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    w[~m] = float("nan")  # a pruned weight does not exist
    x = torch.randn(n, in_f, generator=g, dtype=torch.float64)
    dy = torch.randn(n, out_f, generator=g, dtype=torch.float64)
    return w, m, gm, x, dy


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_chunked_dense_fallback_matches_reference(small_chunk, density):
    w, m, gm, x, dy = _case(density=density)
    b = torch.randn(w.shape[0], dtype=torch.float64)
    pat, gpat = sk.Pattern(m), sk.Pattern(gm)
    torch.testing.assert_close(choice.DENSE.linear_fwd(x, w, b, pat), ref.linear_fwd(x, w, b, m))
    torch.testing.assert_close(choice.DENSE.linear_fwd(x, w, None, pat), ref.linear_fwd(x, w, None, m))
    torch.testing.assert_close(choice.DENSE.linear_dx(dy, w, pat), ref.linear_dx(dy, w, m))
    dense_dw = ref.linear_dw(dy, x, gm)
    vals = choice.DENSE.linear_dw_values(dy, x, gpat)
    assert vals.shape == (int(gm.sum()),)
    torch.testing.assert_close(vals, dense_dw.reshape(-1)[gm.reshape(-1)])


def test_chunked_dense_fallback_forms_no_whole_weight(small_chunk):
    w, m, gm, x, dy = _case(out_f=64, in_f=32)
    pat, gpat = sk.Pattern(m), sk.Pattern(gm)
    sk.formats.flat_index(gpat)  # metadata built outside the watch
    whole = w.numel() * w.element_size()
    with _Allocs() as a:
        choice.DENSE.linear_fwd(x, w, None, pat)
        choice.DENSE.linear_dx(dy, w, pat)
        choice.DENSE.linear_dw_values(dy, x, gpat)
    assert a.sizes and max(a.sizes) < whole
    with _Allocs() as a:  # without chunks the masked weight is whole: the watch does see it
        choice.CHUNK = 1 << 22
        choice.DENSE.linear_fwd(x, w, None, pat)
    assert max(a.sizes) >= whole


def test_chunked_dense_fallback_nonfinite_input_takes_reference(small_chunk):
    w, m, gm, x, dy = _case()
    x[0, 3] = float("inf")
    dy[1, 2] = float("nan")
    pat = sk.Pattern(m)
    torch.testing.assert_close(choice.DENSE.linear_fwd(x, w, None, pat), ref.linear_fwd(x, w, None, m), equal_nan=True)
    torch.testing.assert_close(choice.DENSE.linear_dx(dy, w, pat), ref.linear_dx(dy, w, m), equal_nan=True)


def test_reference_dw_masks_in_place():
    w, m, gm, x, dy = _case(out_f=64, in_f=32)
    whole = w.numel() * w.element_size()
    with _Allocs() as a:
        dw = ref.linear_dw(dy, x, gm)
    assert sum(s >= whole for s in a.sizes) == 1  # the product only, zeroed in place
    assert torch.all(dw[~gm] == 0)
    xg = x.clone().requires_grad_()  # under autograd it is not written in place, and differentiates
    ref.linear_dw(dy, xg, gm).sum().backward()
    torch.testing.assert_close(xg.grad, dy @ gm.double())  # d/dx sum((dyᵀx)⊙G) = dy G


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_sparsify_takes_the_dense_parameters(kind):
    torch.manual_seed(0)
    # larger than one slice of the streamed mask selection (2**18 entries), which is weight-sized
    # for a smaller layer
    dense = nn.Linear(1024, 300) if kind == "linear" else nn.Conv2d(128, 256, 3)
    model = nn.Sequential(dense)
    w, b = dense.weight, dense.bias
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = w.detach().clone()
    with _Allocs() as a:
        sk.sparsify_(model, sk.SparsityConfig(0.75))
    layer = model[0]
    assert layer.weight is w and layer.bias is b
    whole = w.numel() * w.element_size()
    assert all(s < whole for s in a.sizes), "no second weight is made"
    m = layer.weight_mask
    assert torch.equal(w.detach()[m], before[m]) and torch.all(w.detach()[~m] == 0)
    # the optimizer built before the conversion steps the sparse layer's weight
    x = torch.randn(4, 1024) if kind == "linear" else torch.randn(2, 128, 5, 5)
    model(x).square().sum().backward()
    opt.step()
    assert not torch.equal(layer.weight.detach()[m], before[m])
    assert torch.all(layer.weight.detach()[~m] == 0)


def test_from_dense_copies_by_default():
    dense = nn.Linear(16, 8)
    layer = sk.SparseLinear.from_dense(dense, sparsity=0.5)
    assert layer.weight is not dense.weight
    assert torch.count_nonzero(dense.weight) == dense.weight.numel()
    shared = sk.SparseLinear.from_dense(dense, sparsity=0.5, share=True)
    assert shared.weight is dense.weight and shared.weight.device.type == "cpu"
    assert torch.equal(shared(torch.ones(2, 16)), layer(torch.ones(2, 16)))


def test_probe_times_the_compact_gradient_path(monkeypatch):
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    monkeypatch.setenv("SPARSEKERN_AUTO", "probe")
    choice.clear_decisions()
    layer = sk.SparseLinear(256, 256, sparsity=0.9)
    layer.set_grad_layout("compact")
    calls = []
    orig = choice.DenseBackend.linear_dw_values

    def spy(self, *a):
        calls.append("values")
        return orig(self, *a)

    monkeypatch.setattr(choice.DenseBackend, "linear_dw_values", spy)
    layer(torch.randn(64, 256)).sum().backward()
    keys = list(choice.decisions())
    choice.clear_decisions()
    assert len(keys) == 1 and keys[0].endswith("|compact")
    assert calls, "the probe's dense side takes the gradient compactly, as the layer will"


def test_memory_table_runs_each_configuration(tmp_path):
    from sparsekern.bench import memory

    lines = memory.main(["--features", "256", "--batch", "8", "--sparsity", "0.9"])
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| model")]
    assert [r.split("|")[1].strip() for r in rows] == ["dense", "sparse-dense-grad", "sparse-compact"]
    for r in rows:
        cells = [float(c) for c in r.strip("| ").split("|")[1:]]
        assert len(cells) == 6 and all(c == c for c in cells)  # six finite figures per row
    assert float(rows[0].strip("| ").split("|")[-1]) == 0.0  # dense runs no sparsekern kernel


def test_masked_weight_kept_from_forward_to_input_gradient_only():
    kept = choice._KEPT
    w = torch.randn(6, 5, requires_grad=True)
    m = torch.rand(6, 5) < 0.5
    with torch.no_grad():
        wm = kept.made(w, m)
        assert kept.taken(w, m) is wm  # the forward's copy, once
        assert kept.taken(w, m) is not wm  # then made again
        kept.made(w, m)
        w.mul_(2)  # a write after the forward: the kept copy is stale and not used
        torch.testing.assert_close(kept.taken(w, m), torch.where(m, w, 0))
        kept.made(w, m)
        m2 = m.clone()
        m2[0] = ~m2[0]  # another mask: not used either
        torch.testing.assert_close(kept.taken(w, m2), torch.where(m2, w, 0))
    with torch.enable_grad():  # differentiated through (not inside a Function's forward): not kept
        wm = kept.made(w, m)
    assert kept.taken(w, m) is not wm


def test_dense_fallback_training_matches_reference_with_kept_weight():
    torch.manual_seed(1)
    layer = sk.SparseLinear(40, 30, sparsity=0.7, backend=None)
    ref_layer = sk.SparseLinear(40, 30, sparsity=0.7, backend="reference")
    ref_layer.load_state_dict(layer.state_dict())
    x = torch.randn(8, 40, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    for _ in range(3):  # the weight changes between steps: no stale copy may be used
        y, yr = choice_dense(layer, x), ref_layer(xr)
        torch.testing.assert_close(y, yr)
        y.square().sum().backward()
        yr.square().sum().backward()
        torch.testing.assert_close(x.grad, xr.grad)
        torch.testing.assert_close(layer.weight.grad, ref_layer.weight.grad)
        with torch.no_grad():
            for lay in (layer, ref_layer):
                lay.weight -= 0.1 * lay.weight.grad
                lay.weight.grad = None
        x.grad = xr.grad = None


def choice_dense(layer, x):
    """``layer(x)`` on the dense fall-back (pinned through a decision that says dense)."""
    from sparsekern.ops.linear import LinearFunction

    pat = sk.formats.pattern_of(layer.weight_mask, layer.layout, layer.block_size)
    gpat = sk.ops._common.grad_pattern(pat, layer.grad_mask)
    return LinearFunction.apply(x, layer.weight, layer.bias, pat, gpat, choice.DENSE, ())


def test_large_masked_weight_is_not_kept(monkeypatch):
    monkeypatch.setattr(choice, "KEEP_MAX", 10)
    w = torch.randn(6, 5, requires_grad=True)
    m = torch.rand(6, 5) < 0.5
    with torch.no_grad():
        wm = choice._KEPT.made(w, m)
        assert choice._KEPT.taken(w, m) is not wm


def test_scratch_held_reports_the_kernels_scratch(need_cpp):
    before = torch.ops.sparsekern.scratch_held()
    assert len(before) == 10 and all(b >= 0 for b in before)  # one entry per slot (cpu/common.h)
    layer = sk.SparseConv2d(8, 8, 3, padding=1, sparsity=0.9, backend="cpp")
    layer(torch.randn(64, 8, 24, 24)).sum().backward()
    after = torch.ops.sparsekern.scratch_held()
    # at least the padded copy or grid of this batch (64 x 8 x 24 x 24 floats) is held now
    assert sum(after) >= 64 * 8 * 24 * 24 * 4
