"""torch.compile and torch.export of the sparse layers: one graph, eager's results, registered ops.

Compile time on a small shared CPU is long, so one small model and the ``aot_eager`` backend.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import sparsekern
from sparsekern import SparseConv2d, SparseLinear, choice, formats
from sparsekern._backends import Backend
from sparsekern.masks import random_mask
from sparsekern.ops._common import grad_pattern, weight_pattern
from tests.support import requires_cpp


class Net(nn.Module):
    def __init__(self, backend=None):
        super().__init__()
        self.conv = SparseConv2d(3, 8, 3, padding=1, sparsity=0.8, backend=backend)
        self.blocky = SparseLinear(8 * 7 * 7, 32, sparsity=0.5, layout="block", block_size=16, backend=backend)
        self.fc = SparseLinear(32, 10, sparsity=0.9, backend=backend)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = nn.functional.max_pool2d(h, 2, 1).flatten(1)
        return self.fc(torch.relu(self.blocky(h)))


@pytest.fixture
def dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def _step(model, opt, x, y):
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def _assert_same(a: nn.Module, b: nn.Module, what: str) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=f"{what}: {name} differs")
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=f"{what}: {name}.grad differs")


def test_fullgraph_compile_trains_like_eager_and_picks_up_mask_changes(dynamo):
    """Forward + backward in one graph, no graph break, the eager results step by step; a mask
    written between steps (set_mask) is used at once, without a recompile."""
    eager = Net()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    opt_c = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    for step in range(4):
        if step == 2:  # a mask update, as SparCL / DST make between steps
            new = random_mask(eager.fc.weight.shape, 0.7, generator=torch.Generator().manual_seed(1))
            eager.fc.set_mask(new)
            model.fc.set_mask(new)
        le, lc = _step(eager, opt_e, x, y), _step(compiled, opt_c, x, y)
        torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-7)
        _assert_same(eager, model, f"step {step}")
    assert not dynamo["graph_break"], dict(dynamo["graph_break"])
    assert dynamo["stats"]["unique_graphs"] == 1
    # the gradient outside G is exactly zero, as in eager
    assert not model.fc.weight.grad[~model.fc.grad_mask].any()


def test_explain_sees_one_graph_of_registered_ops_and_no_mask_analysis(dynamo):
    model = Net()
    info = torch._dynamo.explain(model)(torch.randn(2, 3, 8, 8))
    assert info.graph_count == 1 and info.graph_break_count == 0, info.break_reasons
    code = "\n".join(g.code for g in info.graphs)
    assert "sparsekern.sparse_conv2d" in code and "sparsekern.sparse_linear" in code
    for word in ("nonzero", "bincount", "equal", "count_nonzero"):
        assert word not in code, f"{word} in the traced graph: metadata must be built outside it"


def test_compiled_calls_build_metadata_once_per_mask_change(dynamo, monkeypatch):
    """The traced op reads the mask's metadata cache: built on the first call after a change only."""
    built = []
    real = formats.build_csr
    monkeypatch.setattr(formats, "build_csr", lambda m: built.append(1) or real(m))
    layer = SparseLinear(64, 32, sparsity=0.9)
    layer.weight_mask.logical_not_().logical_not_()  # a fresh version: nothing cached yet
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(8, 64)
    n0 = None
    for _ in range(3):
        compiled(x).sum().backward()
        n0 = len(built) if n0 is None else n0
    assert len(built) == n0  # steps 2 and 3 rebuilt nothing
    layer.set_mask(torch.rand(32, 64) > 0.5)
    compiled(x).sum().backward()
    assert len(built) > n0


def test_export_for_inference_matches_eager():
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ep = torch.export.export(model, (x,))
        out = ep.module()(x)
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"sparsekern.sparse_conv2d.default", "sparsekern.sparse_linear.default"} <= targets


def test_traced_call_rejects_a_pattern_with_a_reason(dynamo):
    pat = sparsekern.pattern_of(torch.rand(8, 4) > 0.5)
    fn = torch.compile(lambda x, w: sparsekern.sparse_linear(x, w, None, pat), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="not a Pattern"):
        fn(torch.randn(3, 4), torch.randn(8, 4))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_cpp)])
def test_registered_ops_pass_opcheck_and_gradcheck(backend):
    g = torch.Generator().manual_seed(0)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x, w, b = torch.randn(5, 12, **f64), torch.randn(7, 12, **f64), torch.randn(7, **f64)
    m = torch.rand(7, 12, generator=g) > 0.5
    gm = m & (torch.rand(7, 12, generator=g) > 0.3)
    lin = torch.ops.sparsekern.sparse_linear
    torch.library.opcheck(lin, (x, w, b, m, gm, "unstructured", [], backend, "linear", True))
    assert torch.autograd.gradcheck(lambda *t: lin(*t, m, None, "unstructured", [], backend, "linear", True), (x, w, b))
    xc, wc = torch.randn(2, 3, 6, 6, **f64), torch.randn(4, 3, 3, 3, **f64)
    mc = torch.rand(4, 3, 3, 3, generator=g) > 0.5
    conv = torch.ops.sparsekern.sparse_conv2d
    args = ("unstructured", [], backend, True, [2, 1], [1, 1], [1, 1], 1)
    torch.library.opcheck(conv, (xc, wc, None, mc, None, *args))
    assert torch.autograd.gradcheck(lambda x, w: conv(x, w, None, mc, None, *args), (xc, wc))


@requires_cpp
def test_raw_cpp_forward_ops_are_differentiable():
    """register_autograd on the C++ ops: their gradients are the library's dx / dw ops."""
    from sparsekern.kernels.cpu import load_library

    assert load_library()[0]
    ops = torch.ops.sparsekern
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x, w, b = torch.randn(3, 40, **f64), torch.randn(40, 40, **f64), torch.randn(40, **f64)
    m = random_mask((40, 40), 0.5, layout="block", block_size=16, generator=torch.Generator().manual_seed(0))
    bsr = sparsekern.pattern_of(m, "block", 16).bsr()
    csr = sparsekern.pattern_of(m).csr()
    for crow, col, block in (
        (bsr.crow_indices, bsr.col_indices, list(bsr.block)),
        (csr.crow_indices, csr.col_indices, [1, 1]),
    ):
        assert torch.autograd.gradcheck(
            lambda x, w, b, crow=crow, col=col, block=block: ops.linear_fwd(x, w, b, crow, col, block), (x, w, b)
        )
    xc, wc = torch.randn(2, 3, 6, 6, **f64), torch.randn(4, 3, 3, 3, **f64)
    pc = sparsekern.pattern_of(torch.rand(4, 3, 3, 3) > 0.5).csr()
    conv = (pc.crow_indices, pc.col_indices, [1, 1], [2, 1], [1, 1], [1, 1])
    assert torch.autograd.gradcheck(lambda x, w: ops.conv2d_fwd(x, w, None, *conv), (xc, wc))
    xd, wd = torch.randn(2, 4, 6, 6, **f64), torch.randn(4, 1, 3, 3, **f64)
    pd = sparsekern.pattern_of(torch.rand(4, 1, 3, 3) > 0.4).csr()
    dw = (pd.crow_indices, pd.col_indices, [1, 1], [1, 1], [1, 1])
    assert torch.autograd.gradcheck(lambda x, w: ops.dwconv2d_fwd(x, w, None, *dw), (xd, wd))


def test_choice_never_probes_under_tracing(monkeypatch):
    """Under tracing a key not yet decided is decided by the rules (no timed probe)."""
    monkeypatch.setenv("SPARSEKERN_AUTO", "probe")
    choice.clear_decisions()
    monkeypatch.setattr(choice, "_probe", lambda *a: pytest.fail("probed under tracing"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    layer = SparseLinear(512, 512, sparsity=0.95)
    pat = weight_pattern(layer.weight_mask, "unstructured", None)
    x = torch.randn(64, 512)
    dec = choice.choose("linear", _Named("cpp"), x, layer.weight, None, pat, grad_pattern(pat, None))
    assert dec.name == "cpp" and "rules" in choice.last_decision().reason
    choice.clear_decisions()


class _Named(Backend):
    def __init__(self, name):
        self.name = name
