"""The compact gradient layout: ``dW`` on ``G`` only (``linear_dw_values`` / ``conv2d_dw_values``),
a layer's ``grad_values``, and ``sparsekern.optim`` stepping from them.

Every check compares with the dense layout on the same inputs: the compact values are the dense
``dW`` at the positions of ``G`` (``torch.equal``: the kernels accumulate the same terms and only
the final write differs), and the weights after optimizer steps are bit-identical.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern import SparseConv2d, SparseLinear
from sparsekern.formats import flat_index, pattern_of
from tests.support import MARKS, Target

BACKENDS = [pytest.param(n, marks=MARKS[n], id=n) for n in ("reference", "cpp", "triton")]


def _masks(shape, density: float, gen, frozen: float = 0.0, block=None):
    """(M, G): M at ``density`` (block-constant for ``block``), G = M minus a ``frozen`` share."""
    rows = shape[0]
    cols = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
    if block is None:
        m = torch.rand(shape, generator=gen) < density
    else:
        bo, bk = block
        grid = torch.rand((-(-rows // bo), -(-cols // bk)), generator=gen) < density
        m = grid.repeat_interleave(bo, 0).repeat_interleave(bk, 1)[:rows, :cols].reshape(shape)
    g = m & (torch.rand(shape, generator=gen) >= frozen)
    return m, g


LINEAR_CASES = [
    # (N, K, M, density, frozen, block)
    (5, 13, 7, 0.4, 0.0, None),
    (33, 64, 48, 0.1, 0.3, None),
    (8, 40, 24, 0.0, 0.0, None),  # density 0: empty gradient
    (8, 40, 24, 1.0, 0.0, None),  # density 1
    (16, 64, 32, 0.5, 0.0, (16, 16)),
    (7, 70, 50, 0.5, 0.0, (16, 16)),  # partial edge tiles
    (0, 16, 8, 0.5, 0.0, None),  # empty batch
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"N{c[0]}K{c[1]}M{c[2]}d{c[3]}b{c[5]}")
def test_linear_values_are_the_dense_gradient_on_g(backend, case):
    n, k, m_out, density, frozen, block = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    mask, gmask = _masks((m_out, k), density, gen, frozen, block)
    layout = "block" if block else "unstructured"
    pat = pattern_of(mask, layout, block)
    from sparsekern.ops._common import grad_pattern

    gpat = grad_pattern(pat, gmask)
    be = Target(backend).impl
    x, dy = torch.randn(n, k, generator=gen), torch.randn(n, m_out, generator=gen)
    dense = be.linear_dw(dy, x, gpat)
    vals = be.linear_dw_values(dy, x, gpat)
    idx = flat_index(gpat)
    assert vals.shape == (int(gmask.sum()),)
    assert torch.equal(idx.long(), gmask.reshape(-1).nonzero().squeeze(1))
    assert torch.equal(vals, dense.reshape(-1)[idx.long()])


CONV_CASES = [
    # (N, C, O, H, k, stride, pad, density, frozen, block)
    (2, 3, 5, 7, 3, 1, 1, 0.5, 0.2, None),
    (3, 8, 16, 8, 3, 2, 1, 0.1, 0.0, None),
    (2, 16, 16, 4, 1, 1, 0, 0.3, 0.0, None),
    (2, 16, 32, 6, 3, 1, 1, 0.5, 0.0, (16, 16)),
    (2, 4, 4, 5, 3, 1, 1, 0.0, 0.0, None),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"N{c[0]}C{c[1]}O{c[2]}H{c[3]}s{c[5]}d{c[7]}b{c[9]}")
def test_conv_values_are_the_dense_gradient_on_g(backend, case):
    n, c, o, h, kk, stride, pad, density, frozen, block = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    shape = (o, c, kk, kk)
    mat_block = None if block is None else (block[0], block[1] * kk * kk)
    mask, gmask = _masks(shape, density, gen, frozen, mat_block)
    layout = "block" if block else "unstructured"
    pat = pattern_of(mask, layout, block)
    from sparsekern.ops._common import grad_pattern

    gpat = grad_pattern(pat, gmask)
    be = Target(backend).impl
    conv = sparsekern._backends.ConvParams((stride, stride), (pad, pad), (1, 1), 1)
    x = torch.randn(n, c, h, h, generator=gen)
    ho = (h + 2 * pad - kk) // stride + 1
    dy = torch.randn(n, o, ho, ho, generator=gen)
    dense = be.conv2d_dw(dy, x, gpat, shape, conv)
    vals = be.conv2d_dw_values(dy, x, gpat, shape, conv)
    assert torch.equal(vals, dense.reshape(-1)[gmask.reshape(-1).nonzero().squeeze(1)])


def _net(seed: int = 0, block: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    if not block:
        return sparsekern.sparsify_(net, 0.8)
    # block 16 on the layers with 16-multiple channels (the first conv has 3 inputs)
    cfg = sparsekern.SparsityConfig(0.8, layout="block", block_size=16)
    return sparsekern.sparsify_(net, cfg, lambda m, name: name != "0")


def _train(layout: str, opt_name: str, backend: str | None, steps: int = 4, change_masks: bool = True, block=False):
    net = _net(block=block)
    for m in net.modules():
        if isinstance(m, (SparseLinear, SparseConv2d)):
            m.backend = backend
    kw = {"SGD": dict(lr=0.05, momentum=0.9, weight_decay=1e-4), "Adam": dict(lr=1e-3), "AdamW": dict(lr=1e-3)}
    opt = getattr(sparsekern.optim, opt_name)(net.parameters(), model=net, grad_layout=layout, **kw[opt_name])
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        opt.zero_grad()
        out = net(x)
        loss = nn.functional.cross_entropy(out, y) + 0.1 * net(x).square().mean()  # two forwards accumulate
        loss.backward()
        lin = net[5]
        if layout == "compact":
            assert lin.weight.grad is None and lin.grad_values is not None
            assert lin.grad_values.shape == (int(lin.grad_mask.sum()),)
        else:
            assert lin.grad_values is None and lin.weight.grad is not None
        opt.step()
        if change_masks and step == 1:  # a topology update between steps (as DST / SparCL do)
            g = torch.Generator().manual_seed(7)
            for m in (net[2], net[5]) if block else (net[0], net[5]):
                keep = torch.rand(m.weight.shape, generator=g) < 0.3
                m.set_mask(m.weight_mask | keep if not block else m.weight_mask)
                m.set_grad_mask(m.weight_mask & (torch.rand(m.weight.shape, generator=g) < 0.8))
    return net


@pytest.mark.parametrize("backend", [None, "reference", pytest.param("cpp", marks=MARKS["cpp"])])
@pytest.mark.parametrize("opt_name", ["SGD", "Adam", "AdamW"])
def test_compact_layout_trains_bit_identically(backend, opt_name):
    dense = _train("dense", opt_name, backend)
    compact = _train("compact", opt_name, backend)
    for (name, a), b in zip(dense.state_dict().items(), compact.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", [None, pytest.param("cpp", marks=MARKS["cpp"])])
def test_compact_layout_block_layers(backend):
    dense = _train("dense", "SGD", backend, block=True)
    compact = _train("compact", "SGD", backend, block=True)
    for a, b in zip(dense.state_dict().values(), compact.state_dict().values()):
        assert torch.equal(a, b)


def _one_backward(layer, x):
    layer(x).square().sum().backward()


def test_weight_grad_matches_the_dense_layout():
    torch.manual_seed(0)
    a = SparseLinear(24, 12, sparsity=0.7)
    b = copy.deepcopy(a)
    b.set_grad_layout("compact")
    x = torch.randn(5, 24)
    _one_backward(a, x)
    _one_backward(b, x)
    assert b.weight.grad is None
    assert torch.equal(b.weight_grad(), a.weight.grad)
    assert torch.equal(b.grad_index.long(), b.grad_mask.reshape(-1).nonzero().squeeze(1))


def test_grad_mask_changed_after_backward_is_remapped():
    """G changes between backward and step: entries that stay in G take their gradient, new ones
    none -- the same weights as the dense layout."""
    nets = []
    for layout in ("dense", "compact"):
        torch.manual_seed(0)
        net = nn.Sequential(SparseLinear(32, 16, sparsity=0.5))
        opt = sparsekern.optim.SGD(net.parameters(), lr=0.1, model=net, grad_layout=layout)
        net(torch.ones(3, 32)).sum().backward()
        layer = net[0]
        g = layer.weight_mask & (torch.arange(layer.weight.numel()).reshape(layer.weight.shape) % 3 != 0)
        layer.set_grad_mask(g)
        opt.step()
        nets.append(net)
    assert torch.equal(nets[0][0].weight, nets[1][0].weight)


def test_model_zero_grad_does_not_leak_compact_gradients():
    """``step`` consumes the compact gradient, so ``model.zero_grad()`` loops stay correct."""
    torch.manual_seed(0)
    net = nn.Sequential(SparseLinear(16, 8, sparsity=0.5))
    ref = copy.deepcopy(net)
    opt = sparsekern.optim.SGD(net.parameters(), lr=0.1, model=net, grad_layout="compact")
    ref_opt = sparsekern.optim.SGD(ref.parameters(), lr=0.1, model=ref)
    for _ in range(3):
        for m, o in ((net, opt), (ref, ref_opt)):
            m.zero_grad()
            m(torch.ones(2, 16)).sum().backward()
            o.step()
        assert net[0].grad_values is None
    assert torch.equal(net[0].weight, ref[0].weight)


def test_frozen_layer_and_no_grad_make_no_sink():
    layer = SparseLinear(8, 4, sparsity=0.5)
    layer.set_grad_layout("compact")
    with torch.no_grad():
        layer(torch.ones(1, 8))
    assert layer.grad_values is None
    layer.weight.requires_grad_(False)
    layer(torch.ones(1, 8, requires_grad=True)).sum().backward()
    assert layer.grad_values is None and layer.weight.grad is None


def test_copies_and_pickles_start_without_a_gradient():
    layer = SparseLinear(8, 4, sparsity=0.5)
    layer.set_grad_layout("compact")
    layer(torch.ones(2, 8)).sum().backward()
    assert layer.grad_values is not None
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert other.grad_layout == "compact" and other.grad_values is None
        other(torch.ones(2, 8)).sum().backward()
        assert torch.equal(other.grad_values, layer.grad_values)


def test_autocast_compact_gradient_is_in_the_parameter_dtype():
    torch.manual_seed(0)
    a = SparseLinear(32, 16, sparsity=0.8)
    b = copy.deepcopy(a)
    b.set_grad_layout("compact")
    x = torch.randn(4, 32)
    for m in (a, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().sum().backward()
    assert b.grad_values.dtype == torch.float32
    assert torch.equal(b.weight_grad(), a.weight.grad)


def test_bad_layout_names_the_argument():
    layer = SparseLinear(4, 4)
    with pytest.raises(ValueError, match="layout"):
        layer.set_grad_layout("sparse")
    with pytest.raises(ValueError, match="grad_layout"):
        sparsekern.optim.SGD(layer.parameters(), lr=0.1, model=layer, grad_layout="csr")


def test_stock_optimizer_keeps_working_in_the_default_layout():
    """The default is the dense layout: torch.optim sees ``weight.grad`` as for nn.Linear."""
    torch.manual_seed(0)
    layer = SparseLinear(8, 4, sparsity=0.5)
    assert layer.grad_layout == "dense"
    before = layer.weight.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.ones(2, 8)).sum().backward()
    opt.step()
    moved = layer.weight != before
    assert bool(moved.any()) and not bool((moved & ~layer.grad_mask).any())
