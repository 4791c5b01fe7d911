"""SparseLinear / SparseConv2d: drop-in behaviour, masks, state_dict interchange, prune interop."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import sparsekern as sk
from sparsekern.testing import assert_close, make_block_mask, make_mask
from tests import support


def test_linear_mirrors_nn_linear():
    dense = nn.Linear(10, 7)
    layer = sk.SparseLinear(10, 7)
    assert layer.weight.shape == dense.weight.shape and layer.bias.shape == dense.bias.shape
    assert layer.weight_mask.dtype == torch.bool and layer.weight_mask.all()
    assert layer.density() == 1.0
    assert isinstance(layer, nn.Linear)
    layer.load_state_dict(dense.state_dict())  # strict: a dense state dict loads as is
    x = torch.randn(3, 10)
    assert_close(layer(x), dense(x))
    assert set(layer.state_dict()) == {"weight", "bias", "weight_mask", "grad_mask"}
    nobias = sk.SparseLinear(4, 3, bias=False, dtype=torch.float64)
    assert nobias.bias is None and nobias.weight.dtype == torch.float64


def test_conv_mirrors_nn_conv2d_all_padding_modes():
    x = torch.randn(2, 4, 7, 6)
    for mode in ("zeros", "reflect", "replicate", "circular"):
        dense = nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode=mode)
        conv = sk.SparseConv2d.from_dense(dense)
        assert_close(conv(x), dense(x))
    dense = nn.Conv2d(4, 6, (3, 2), padding="same", dilation=2, bias=False)
    conv = sk.SparseConv2d.from_dense(dense)
    assert_close(conv(x), dense(x))
    dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    assert_close(sk.SparseConv2d.from_dense(dw)(x), dw(x))


@pytest.mark.parametrize("layout,block", [("unstructured", None), ("block", 16)])
def test_sparsity_argument_and_density(layout, block):
    layer = sk.SparseLinear(64, 48, sparsity=0.75, layout=layout, block_size=block)
    assert abs(layer.density() - 0.25) < 0.02
    assert torch.all(layer.weight.detach()[~layer.weight_mask] == 0)
    x = torch.randn(5, 64)
    assert_close(layer(x), F.linear(x, layer.weight * layer.weight_mask, layer.bias))
    conv = sk.SparseConv2d(32, 32, 3, padding=1, sparsity=0.5, layout=layout, block_size=block)
    assert abs(conv.density() - 0.5) < 0.02
    r = repr(conv)
    assert "density=0.5" in r and f"layout={layout}" in r


def test_from_dense_to_dense_roundtrip():
    dense = nn.Linear(9, 5)
    mask = make_mask(dense.weight.shape, "random", 0.5)
    layer = sk.SparseLinear.from_dense(dense, mask)
    assert torch.equal(layer.weight_mask, mask)
    back = layer.to_dense()
    assert type(back) is nn.Linear
    x = torch.randn(4, 9)
    assert_close(back(x), layer(x))
    assert torch.equal(back.weight, dense.weight * mask)
    conv = nn.Conv2d(3, 4, 3)
    sconv = sk.SparseConv2d.from_dense(conv, sparsity=0.5)
    assert abs(sconv.density() - 0.5) < 0.03
    xc = torch.randn(1, 3, 6, 6)
    assert_close(sconv.to_dense()(xc), sconv(xc))
    with pytest.raises(TypeError, match="module: expected nn.Linear"):
        sk.SparseLinear.from_dense(conv)


def test_state_dict_roundtrip_with_dense_modules():
    conv = sk.SparseConv2d(3, 8, 3, padding=1, sparsity=0.6)
    sd = conv.state_dict()
    # sparse -> sparse: masks come along
    other = sk.SparseConv2d(3, 8, 3, padding=1)
    other.load_state_dict(sd)
    assert torch.equal(other.weight_mask, conv.weight_mask) and torch.equal(other.grad_mask, conv.grad_mask)
    # sparse -> dense: through dense_state_dict, strictly
    dense = nn.Conv2d(3, 8, 3, padding=1)
    dense.load_state_dict(sk.dense_state_dict(sd))
    x = torch.randn(2, 3, 5, 5)
    assert_close(dense(x), conv(x))
    # serialisation keeps bool buffers
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    again = sk.SparseConv2d(3, 8, 3, padding=1)
    again.load_state_dict(torch.load(buf))
    assert_close(again(x), conv(x))


def test_state_dict_rejects_grad_mask_outside_weight_mask():
    layer = sk.SparseLinear(4, 3, sparsity=0.5)
    sd = layer.state_dict()
    sd["grad_mask"] = torch.ones(3, 4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="grad_mask"):
        sk.SparseLinear(4, 3).load_state_dict(sd)


def test_prune_masks_are_accepted():
    dense = nn.Linear(8, 6)
    prune.l1_unstructured(dense, "weight", amount=0.5)
    layer = sk.SparseLinear.from_dense(dense)
    assert torch.equal(layer.weight_mask, dense.weight_mask.bool())
    x = torch.randn(3, 8)
    assert_close(layer(x), dense(x))
    # a pruned module's state dict (weight_orig + float weight_mask) loads too
    fresh = sk.SparseLinear(8, 6)
    fresh.load_state_dict(dense.state_dict())
    assert torch.equal(fresh.weight_mask, dense.weight_mask.bool())
    assert_close(fresh(x), dense(x))
    # and sparsify_ takes the pruned mask over the config
    model = nn.Sequential(nn.Linear(8, 6))
    prune.random_unstructured(model[0], "weight", amount=0.3)
    pm = model[0].weight_mask.bool().clone()
    sk.sparsify_(model, sk.SparsityConfig(0.9))
    assert torch.equal(model[0].weight_mask, pm)


def test_set_mask_semantics():
    layer = sk.SparseLinear(6, 4, sparsity=0.5)
    old = layer.weight_mask.clone()
    frozen = old & (torch.arange(24).view(4, 6) % 3 == 0)
    layer.set_grad_mask(old & ~frozen)
    new = old.clone()
    grown = ~old & (torch.arange(24).view(4, 6) % 2 == 0)
    new |= grown
    dropped = old & (torch.arange(24).view(4, 6) % 5 == 0)
    new &= ~dropped
    layer.set_mask(new)
    assert torch.equal(layer.weight_mask, new)
    g = layer.grad_mask
    assert not g[frozen & new].any(), "frozen weights that stay stay frozen"
    assert g[grown & new].all(), "grown weights are trainable"
    assert not g[~new].any(), "removed weights leave the gradient mask"
    assert torch.all(layer.weight.detach()[~new] == 0), "pruned weights are zeroed"
    with pytest.raises(ValueError, match="grad_mask: must be a subset"):
        layer.set_mask(new, grad_mask=torch.ones_like(new))
    with pytest.raises(ValueError, match="subset of weight_mask"):
        layer.set_grad_mask(torch.ones_like(new))
    with pytest.raises(ValueError, match="mask: expected the weight's shape"):
        layer.set_mask(torch.ones(6, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        layer.set_mask([[1, 0]])


def test_set_mask_invalidates_cached_metadata():
    layer = sk.SparseLinear(8, 8, sparsity=0.5, backend="reference")
    x = torch.randn(2, 8)
    layer(x)
    new = make_mask((8, 8), "random", 0.3)
    layer.set_mask(new)
    assert_close(layer(x), F.linear(x, layer.weight * new, layer.bias))
    assert torch.equal(sk.pattern_of(layer.weight_mask).csr().to_mask(), new)


def test_block_module_rejects_non_block_mask():
    layer = sk.SparseLinear(32, 32, layout="block", block_size=16)
    with pytest.raises(ValueError, match="constant"):
        layer.set_mask(make_mask((32, 32), "random", 0.5))
    good = make_block_mask((32, 32), (16, 16), 0.5)
    layer.set_mask(good)
    assert torch.equal(layer.weight_mask, good)
    with pytest.raises(ValueError, match="block_size: required"):
        sk.SparseLinear(4, 4, layout="block")


def test_module_moves_and_copies_with_buffers():
    layer = sk.SparseLinear(5, 3, sparsity=0.4)
    l64 = copy.deepcopy(layer).double()
    assert l64.weight.dtype == torch.float64 and l64.weight_mask.dtype == torch.bool
    assert torch.equal(l64.weight_mask, layer.weight_mask)
    x = torch.randn(2, 5, dtype=torch.float64)
    assert_close(l64(x), F.linear(x, l64.weight * l64.weight_mask, l64.bias))
    meta = layer.to("meta")
    assert meta.weight_mask.device.type == "meta"


def test_frozen_weight_parameter_skips_weight_grad():
    layer = sk.SparseLinear(5, 3, sparsity=0.4)
    layer.weight.requires_grad_(False)
    x = torch.randn(2, 5, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and x.grad is not None and layer.bias.grad is not None


def test_selected_backend_and_backend_argument():
    layer = sk.SparseLinear(4, 4, backend="reference")
    assert layer.selected_backend() == "reference"
    with pytest.raises(ValueError, match="backend"):
        sk.SparseLinear(4, 4, backend="magic")


def _derived_items(mask):
    cache = sk.formats.meta_cache(mask)
    return cache, {k: cache.peek(k) for k in cache.keys()}


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize(
    "backend,layout",
    [
        ("reference", "unstructured"),
        ("cpp", "unstructured"),
        ("cpp", "block"),
        ("triton", "unstructured"),
        ("triton", "block"),
    ],
)
def test_mask_edit_through_module_rebuilds_every_derived_item(kind, backend, layout, monkeypatch):
    from sparsekern.kernels import cpu as cppmod

    # small gates, so the cpp linear layer takes the column-window path and caches its windows
    monkeypatch.setattr(cppmod, "WINDOW", 4)
    monkeypatch.setattr(cppmod, "WINDOW_MIN_BATCH", 1)
    monkeypatch.setattr(cppmod, "WINDOW_MIN_DENSITY", 0.0)
    kw = dict(layout=layout, block_size=16 if layout == "block" else None, backend=backend)
    if kind == "linear":
        layer, x = sk.SparseLinear(48, 32, **kw), torch.randn(4, 48, requires_grad=True)
    else:
        layer, x = sk.SparseConv2d(16, 32, 3, padding=1, **kw), torch.randn(2, 16, 6, 6, requires_grad=True)
    try:
        layer.selected_backend()
    except sk.BackendError as exc:
        if backend == "cpp" and support.STRICT:  # a missing C++ build must not pass as a skip
            pytest.fail(f"cpp is required here (SPARSEKERN_STRICT / CI): {exc}")
        pytest.skip(f"{backend} cannot run here: {exc}")

    def masks():
        m = (
            make_block_mask(layer.weight.shape, (16, 16), 0.5)
            if layout == "block"
            else make_mask(layer.weight.shape, "random", 0.5)
        )
        return m, m & (torch.rand(layer.weight.shape) < 0.5)  # G a strict subset of M

    def step():
        layer.zero_grad()
        layer(x).sum().backward()

    layer.set_mask(*masks())
    step()
    cache, before = _derived_items(layer.weight_mask)
    block = sk.pattern_of(layer.weight_mask, layout, kw["block_size"]).block_size
    assert ("pattern", layout, block) in before and ("grad_pattern", layout, block) in before
    if backend == "cpp" and kind == "linear" and layout == "unstructured":
        assert {("csr", "cpp.windows", False, 4), ("csr", "cpp.windows", True, 4)} <= set(before)
    gpat = before[("grad_pattern", layout, block)]
    gcache, gbefore = gpat.cache, {k: gpat.cache.peek(k) for k in gpat.cache.keys()}
    if backend == "triton":  # the weight gradient runs on G's own pattern (and cache)
        assert any(k[-1] == "triton.walk_orders" for k in (*before, *gbefore))

    step()  # an unchanged mask reuses every derived item
    again, after = _derived_items(layer.weight_mask)
    assert again is cache and after.keys() == before.keys()
    assert all(after[k] is v for k, v in before.items())
    assert gpat.cache is gcache and all(gcache.peek(k) is v for k, v in gbefore.items())

    layer.set_grad_mask(masks()[1] & layer.weight_mask)  # G alone: only the gradient pattern is rebuilt
    step()
    again, after = _derived_items(layer.weight_mask)
    assert again is cache
    assert all((after[k] is not v) == (k[0] == "grad_pattern") for k, v in before.items())

    layer.set_mask(*masks())  # a new M rebuilds everything, and the same items come back
    step()
    fresh, rebuilt = _derived_items(layer.weight_mask)
    assert fresh is not cache and rebuilt.keys() == before.keys()
    assert all(rebuilt[k] is not v for k, v in before.items() if not isinstance(v, int))
    if layout == "block":
        assert torch.equal(rebuilt[("bsr", block)].to_mask(), layer.weight_mask.reshape(32, -1))
    if ("csr",) in rebuilt:
        assert torch.equal(rebuilt[("csr",)].to_mask(), layer.weight_mask.reshape(32, -1))
