"""The per-call choice between the sparse kernels and dense masked compute (sparsekern.choice)."""

import json

import pytest
import torch

import sparsekern as sk
from sparsekern import choice
from sparsekern.kernels.cpu import load_library

HAVE_CPP = load_library()[0]
needs_cpp = pytest.mark.skipif(not HAVE_CPP, reason="sparsekern._C not built")


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    monkeypatch.delenv("SPARSEKERN_DECISIONS", raising=False)
    monkeypatch.setenv("SPARSEKERN_AUTO", "probe")
    choice.clear_decisions()
    yield
    choice.clear_decisions()


def _mask(shape, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


def _poisoned(w, m):
    """A weight with NaN and Inf stored outside the mask: a pruned weight must not exist."""
    w = w.clone()
    off = (~m).nonzero()
    if len(off):
        w[tuple(off[0])] = float("nan")
        w[tuple(off[-1])] = float("inf")
    return w


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_dense_backend_linear_matches_reference(density):
    x = torch.randn(7, 13, dtype=torch.float64, requires_grad=True)
    m = _mask((5, 13), density)
    g = m & _mask((5, 13), 0.5, seed=1)
    w0 = torch.randn(5, 13, dtype=torch.float64)
    w = _poisoned(w0, m).requires_grad_()
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    pat = sk.Pattern(m)
    gpat = sk.Pattern(g)
    y = choice.DENSE.linear_fwd(x, w, b, pat)
    dy = torch.randn_like(y)
    from sparsekern import reference as ref

    torch.testing.assert_close(y, ref.linear_fwd(x, w0, b, m))
    torch.testing.assert_close(choice.DENSE.linear_dx(dy, w, pat), ref.linear_dx(dy, w0, m))
    dw = choice.DENSE.linear_dw(dy, x, gpat)
    torch.testing.assert_close(dw, ref.linear_dw(dy, x, g))
    assert torch.all(dw[~g] == 0) and torch.isfinite(y).all()


def test_dense_backend_conv_matches_reference():
    conv = sk._backends.ConvParams((2, 1), (1, 0), (1, 2), 1)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    m = _mask((4, 3, 3, 3), 0.2)
    w0 = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    w = _poisoned(w0, m)
    pat = sk.Pattern(m)
    from sparsekern import reference as ref

    y = choice.DENSE.conv2d_fwd(x, w, None, pat, conv)
    torch.testing.assert_close(y, ref.conv2d_fwd(x, w0, None, m, conv))
    dy = torch.randn_like(y)
    torch.testing.assert_close(
        choice.DENSE.conv2d_dx(dy, w, pat, tuple(x.shape), conv), ref.conv2d_dx(dy, w0, m, tuple(x.shape), conv)
    )
    dw = choice.DENSE.conv2d_dw(dy, x, pat, tuple(w.shape), conv)
    torch.testing.assert_close(dw, ref.conv2d_dw(dy, x, m, tuple(w.shape), conv))
    assert torch.all(dw[~m] == 0)
    dx2, dw2 = choice.DENSE.conv2d_dx_dw(dy, x, w, pat, pat, conv)
    torch.testing.assert_close(dx2, ref.conv2d_dx(dy, w0, m, tuple(x.shape), conv))
    torch.testing.assert_close(dw2, dw)


def test_tiny_layer_runs_dense_with_the_same_gradients():
    """The semantics of the dense path: forward on W⊙M, dW exactly zero outside G, as the spec."""
    torch.manual_seed(0)
    layer = sk.SparseLinear(16, 8, sparsity=0.8)
    layer.set_grad_mask(layer.weight_mask & _mask((8, 16), 0.5))
    spec = sk.SparseLinear(16, 8, backend="reference")
    spec.load_state_dict(layer.state_dict())
    x = torch.randn(4, 16)
    layer(x).square().sum().backward()
    spec(x).square().sum().backward()
    assert layer.last_choice is not None and layer.last_choice.path == "dense"
    assert "too small" in layer.last_choice.reason
    torch.testing.assert_close(layer.weight.grad, spec.weight.grad)
    assert torch.all(layer.weight.grad[~layer.grad_mask] == 0)


def test_high_density_runs_dense_without_probe(monkeypatch):
    monkeypatch.setattr(choice, "_probe", lambda *a, **k: pytest.fail("no probe expected"))
    layer = sk.SparseLinear(512, 512, sparsity=0.3)
    layer(torch.randn(64, 512))
    assert layer.last_choice.path == "dense" and "density" in layer.last_choice.reason


@pytest.mark.parametrize("faster", ["sparse", "dense"])
def test_probe_keeps_the_faster_path(monkeypatch, faster):
    times = (1.0, 3.0) if faster == "sparse" else (3.0, 1.0)
    calls = []
    monkeypatch.setattr(choice, "_probe", lambda *a, **k: calls.append(1) or times)
    layer = sk.SparseLinear(512, 512, sparsity=0.9)
    x = torch.randn(64, 512)
    for _ in range(3):
        layer(x).sum().backward()
    assert len(calls) == 1  # decided once per key, then cached
    assert layer.last_choice.path == faster
    rows = sk.explain(torch.nn.Sequential(layer))
    assert rows[0]["runs"].startswith(faster) and "probe" in rows[0]["why"]


def test_sparse_must_win_by_the_margin(monkeypatch):
    monkeypatch.setattr(choice, "_probe", lambda *a, **k: (1.0, 1.0 * choice.MARGIN * 0.99))
    layer = sk.SparseLinear(512, 512, sparsity=0.9)
    layer(torch.randn(64, 512))
    assert layer.last_choice.path == "dense"


@needs_cpp
def test_real_probe_records_times_and_decisions_persist(tmp_path, monkeypatch):
    path = tmp_path / "decisions.json"
    monkeypatch.setenv("SPARSEKERN_DECISIONS", str(path))
    layer = sk.SparseLinear(256, 256, sparsity=0.95)
    x = torch.randn(64, 256)
    layer(x).sum().backward()
    dec = layer.last_choice
    assert dec.sparse_ms > 0 and dec.dense_ms > 0 and dec.backend in ("cpp", "dense")
    data = json.loads(path.read_text())
    assert [d["key"] for d in data["decisions"]] == [dec.key]
    # pinned from the file in a new process: flip it and check the flipped path runs
    flipped = "dense" if dec.path == "sparse" else "sparse"
    data["decisions"][0]["path"] = flipped
    data["decisions"][0]["backend"] = "dense" if flipped == "dense" else "cpp"
    path.write_text(json.dumps(data))
    choice.clear_decisions()
    layer(x)
    assert layer.last_choice.path == flipped


@needs_cpp
def test_fixed_decision_is_bit_identical_to_the_pinned_backend(monkeypatch):
    monkeypatch.setattr(choice, "_probe", lambda *a, **k: (1.0, 5.0))  # sparse wins
    torch.manual_seed(0)
    auto = sk.SparseLinear(300, 200, sparsity=0.9)
    pinned = sk.SparseLinear(300, 200, backend="cpp")
    pinned.load_state_dict(auto.state_dict())
    x = torch.randn(33, 300)
    ya, yp = auto(x), pinned(x)
    ya.sum().backward()
    yp.sum().backward()
    assert auto.last_choice.path == "sparse" and pinned.last_choice is None
    assert torch.equal(ya, yp) and torch.equal(auto.weight.grad, pinned.weight.grad)


def test_modes_off_and_rules(monkeypatch):
    layer = sk.SparseLinear(16, 8, sparsity=0.8)
    monkeypatch.setenv("SPARSEKERN_AUTO", "off")
    layer(torch.randn(2, 16))
    assert layer.last_choice is None
    monkeypatch.setenv("SPARSEKERN_AUTO", "rules")
    big = sk.SparseLinear(512, 512, sparsity=0.9)
    monkeypatch.setattr(choice, "_probe", lambda *a, **k: pytest.fail("rules mode must not time"))
    big(torch.randn(64, 512))
    assert big.last_choice.path == "sparse"
    monkeypatch.setenv("SPARSEKERN_AUTO", "sometimes")
    with pytest.raises(ValueError, match="SPARSEKERN_AUTO"):
        big(torch.randn(64, 512))


def test_explicit_backend_is_never_switched(monkeypatch):
    monkeypatch.setattr(choice, "_probe", lambda *a, **k: pytest.fail("explicit backend: no choice"))
    layer = sk.SparseLinear(16, 8, sparsity=0.8, backend="reference")
    layer(torch.randn(2, 16))
    assert layer.last_choice is None
    assert sk.explain(torch.nn.Sequential(layer))[0]["why"] == "pinned by backend="
    assert sk.SparseLinear(4, 4, backend="auto").backend is None


def test_flop_counter_counts_what_ran():
    from sparsekern_cl.flops import FlopCounter

    layer = sk.SparseLinear(16, 8, sparsity=0.75)  # tiny: runs dense
    counter = FlopCounter(torch.nn.Sequential(layer))
    counter.active = True
    layer(torch.randn(4, 16, requires_grad=True)).sum().backward()
    assert layer.last_choice.path == "dense"
    assert counter.total == pytest.approx(counter.dense_total)


def test_bad_decisions_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="path"):
        choice.load_decisions(p)


def test_conv_layer_on_the_dense_path_matches_the_spec():
    torch.manual_seed(0)
    layer = sk.SparseConv2d(3, 4, 3, stride=2, padding=1, sparsity=0.7)
    spec = sk.SparseConv2d(3, 4, 3, stride=2, padding=1, backend="reference")
    spec.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    xs = x.detach().clone().requires_grad_()
    layer(x).square().sum().backward()
    spec(xs).square().sum().backward()
    assert layer.last_choice.path == "dense"
    torch.testing.assert_close(layer.weight.grad, spec.weight.grad)
    torch.testing.assert_close(x.grad, xs.grad)
    assert torch.all(layer.weight.grad[~layer.weight_mask] == 0)


def test_decision_key_buckets_the_batch():
    """Batch sizes up to the same power of two share one decision (one probe per bucket)."""
    from sparsekern.choice import _batch_bucket

    assert _batch_bucket(17) == _batch_bucket(32) == "<=32"
    assert _batch_bucket(33) == _batch_bucket(64) != _batch_bucket(32)
    assert _batch_bucket(1) == "<=1"


def test_inference_key_ignores_the_gradient_mask():
    """A method that moves G (DST, EsaCL freezing earlier tasks' weights) keeps one inference
    decision per layer; a training call's key still has G's density (it sets the dW cost)."""
    from sparsekern.choice import _key
    from sparsekern.formats import pattern_of

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g)
    m = torch.rand(16, 32, generator=g) < 0.2
    p = pattern_of(m, "unstructured", None)
    ga, gb = pattern_of(m & (torch.rand(16, 32, generator=g) < 0.5), "unstructured", None), p
    be = sk._backends.get_backend("reference")
    x = torch.randn(8, 32)
    assert _key("linear", be, x, w, p, ga, None, False) == _key("linear", be, x, w, p, gb, None, False)
    assert _key("linear", be, x, w, p, ga, None, True) != _key("linear", be, x, w, p, gb, None, True)
