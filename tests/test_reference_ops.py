"""Reference ops against plain dense masked PyTorch; gradcheck; gradient-mask semantics; bad input."""

import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern.testing import assert_close, conv_cases, linear_cases, make_block_mask, make_mask

REF = {"backend": "reference"}


def _dense_linear_grads(x, w, b, mask, grad_mask, dy):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    y = F.linear(x, w * mask, b)
    y.backward(dy)
    gw = w.grad * grad_mask
    return y.detach(), x.grad, gw, None if b is None else b.grad


def _run(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    return leaves, fn(*leaves)


@pytest.mark.parametrize("case", linear_cases(), ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_matches_dense(case, dtype):
    x = torch.randn(case.batch, case.in_features, dtype=dtype)
    w = torch.randn(case.out_features, case.in_features, dtype=dtype)
    b = torch.randn(case.out_features, dtype=dtype)
    mask = make_mask(w.shape, case.kind, case.density)
    grad_mask = mask & (torch.rand(w.shape) < 0.6)
    dy = torch.randn(case.batch, case.out_features, dtype=dtype)
    (xl, wl, bl), y = _run(lambda x, w, b: sk.sparse_linear(x, w, b, mask, grad_mask, **REF), x, w, b)
    y.backward(dy)
    ye, gx, gw, gb = _dense_linear_grads(x, w, b, mask, grad_mask, dy)
    assert_close(y, ye)
    assert_close(xl.grad, gx)
    assert_close(wl.grad, gw)
    assert_close(bl.grad, gb)
    assert torch.all(wl.grad[~grad_mask] == 0)


@pytest.mark.parametrize("case", conv_cases(), ids=lambda c: c.id)
def test_conv2d_matches_dense(case):
    dtype = torch.float64
    x = torch.randn(case.batch, case.in_channels, *case.hw, dtype=dtype)
    w = torch.randn(case.out_channels, case.in_channels // case.groups, case.kernel, case.kernel, dtype=dtype)
    b = torch.randn(case.out_channels, dtype=dtype)
    mask = make_mask(w.shape, case.kind, case.density)
    grad_mask = mask & (torch.rand(w.shape) < 0.6)
    args = (case.stride, case.padding, case.dilation, case.groups)
    (xl, wl, bl), y = _run(lambda x, w, b: sk.sparse_conv2d(x, w, b, mask, grad_mask, *args, **REF), x, w, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    xd, wd, bd = (t.detach().clone().requires_grad_() for t in (x, w, b))
    yd = F.conv2d(xd, wd * mask, bd, *args)
    yd.backward(dy)
    assert_close(y, yd)
    assert_close(xl.grad, xd.grad)
    assert_close(wl.grad, wd.grad * grad_mask)
    assert_close(bl.grad, bd.grad)
    assert torch.all(wl.grad[~grad_mask] == 0)


@pytest.mark.parametrize("block", [(16, 16), (16, 32)])
def test_block_layout_linear_and_conv(block):
    w = torch.randn(33, 47, dtype=torch.float64)
    mask = make_block_mask(w.shape, block, 0.5, empty_block_rows=True)
    x = torch.randn(5, 47, dtype=torch.float64)
    y = sk.sparse_linear(x, w, None, mask, layout="block", block_size=block, **REF)
    assert_close(y, F.linear(x, w * mask))
    wc = torch.randn(32, 20, 3, 3, dtype=torch.float64)
    mc = make_block_mask(wc.shape, block, 0.5)
    xc = torch.randn(2, 20, 6, 6, dtype=torch.float64)
    yc = sk.sparse_conv2d(xc, wc, None, mc, None, 1, 1, layout="block", block_size=block, **REF)
    assert_close(yc, F.conv2d(xc, wc * mc, None, 1, 1))
    with pytest.raises(ValueError, match="constant"):
        sk.sparse_linear(x, w, None, make_mask(w.shape, "random", 0.5), layout="block", block_size=block, **REF)


def test_noncontiguous_and_batched_inputs():
    w = torch.randn(12, 10, dtype=torch.float64)
    mask = make_mask(w.shape, "random", 0.4)
    xt = torch.randn(10, 6, dtype=torch.float64).t()  # non-contiguous [6, 10]
    assert not xt.is_contiguous()
    assert_close(sk.sparse_linear(xt, w, None, mask, **REF), F.linear(xt, w * mask))
    xb = torch.randn(2, 3, 4, 10, dtype=torch.float64)
    y = sk.sparse_linear(xb, w, None, mask, **REF)
    assert y.shape == (2, 3, 4, 12)
    assert_close(y, F.linear(xb, w * mask))
    xc = torch.randn(2, 3, 9, 9, dtype=torch.float64)[:, :, ::2, ::2]  # strided spatial view
    wc = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    mc = make_mask(wc.shape, "random", 0.5)
    assert_close(sk.sparse_conv2d(xc, wc, None, mc, None, 1, 1, **REF), F.conv2d(xc, wc * mc, None, 1, 1))
    # unbatched conv input, like nn.Conv2d
    assert_close(sk.sparse_conv2d(xc[0], wc, None, mc, None, 1, 1, **REF), F.conv2d(xc[0], wc * mc, None, 1, 1))


def test_empty_batch():
    w = torch.randn(5, 4)
    mask = make_mask(w.shape, "random")
    x = torch.randn(0, 4, requires_grad=True)
    y = sk.sparse_linear(x, w, None, mask, **REF)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert x.grad.shape == (0, 4)


def test_pruned_values_never_leak():
    """Non-finite values stored at pruned positions must not reach any output or gradient."""
    w = torch.randn(6, 5, dtype=torch.float64)
    mask = make_mask(w.shape, "random", 0.5)
    w[~mask] = float("nan")
    w.requires_grad_()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y = sk.sparse_linear(x, w, None, mask, **REF)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("kind", ["random", "dense", "single", "empty_rows"])
def test_gradcheck_linear(kind):
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    mask = make_mask(w.shape, kind, 0.5)
    assert torch.autograd.gradcheck(lambda x, w, b: sk.sparse_linear(x, w, b, mask, **REF), (x, w, b))


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 0, 1, 1), (1, 2, 2, 1), (1, 1, 1, 4)])
def test_gradcheck_conv2d(stride, padding, dilation, groups):
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4 // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    mask = make_mask(w.shape, "random", 0.5)
    fn = lambda x, w, b: sk.sparse_conv2d(x, w, b, mask, None, stride, padding, dilation, groups, **REF)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_gradcheck_spmm_sddmm():
    w = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    mask = make_mask(w.shape, "random", 0.5)
    a = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    at = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: sk.spmm(a, w, mask, **REF), (a, w))
    assert torch.autograd.gradcheck(lambda a, w: sk.spmm(a, w, mask, transpose=False, **REF), (at, w))
    p = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, q: sk.sddmm(p, q, mask, **REF), (p, q))


def test_spmm_sddmm_values():
    w = torch.randn(6, 5)
    mask = make_mask(w.shape, "empty_cols", 0.6)
    a = torch.randn(4, 5)
    assert_close(sk.spmm(a, w, mask, **REF), a @ (w * mask).t())
    at = torch.randn(4, 6)
    assert_close(sk.spmm(at, w, mask, transpose=False, **REF), at @ (w * mask))
    p, q = torch.randn(6, 3), torch.randn(3, 5)
    c = sk.sddmm(p, q, mask, **REF)
    assert_close(c, (p @ q) * mask)
    assert torch.all(c[~mask] == 0)


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam", "rmsprop"])
def test_weights_outside_grad_mask_never_move(opt_name):
    torch.manual_seed(3)
    layer = sk.SparseLinear(12, 8, sparsity=0.5, backend="reference")
    frozen = layer.weight_mask & (torch.rand(layer.weight.shape) < 0.5)
    layer.set_grad_mask(layer.weight_mask & ~frozen)
    conv = sk.SparseConv2d(3, 4, 3, padding=1, sparsity=0.5, backend="reference")
    cfrozen = conv.weight_mask & (torch.rand(conv.weight.shape) < 0.5)
    conv.set_grad_mask(conv.weight_mask & ~cfrozen)
    before = layer.weight.detach().clone(), conv.weight.detach().clone()
    params = list(layer.parameters()) + list(conv.parameters())
    opt = {
        "sgd_momentum": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
        "adam": lambda: torch.optim.Adam(params, lr=0.1),
        "rmsprop": lambda: torch.optim.RMSprop(params, lr=0.1, momentum=0.5),
    }[opt_name]()
    for _ in range(5):
        loss = layer(torch.randn(4, 12)).pow(2).sum() + conv(torch.randn(2, 3, 5, 5)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for mod, fr, b in ((layer, frozen, before[0]), (conv, cfrozen, before[1])):
        outside_g = ~mod.grad_mask
        assert torch.equal(mod.weight.detach()[outside_g], b[outside_g])  # frozen and pruned: bit-identical
        assert torch.equal(mod.weight.detach()[fr], b[fr])
        trainable = mod.grad_mask
        assert not torch.equal(mod.weight.detach()[trainable], b[trainable])  # the rest learned


class TestBadInput:
    w = torch.randn(6, 5)
    m = torch.ones(6, 5, dtype=torch.bool)

    def test_shapes(self):
        with pytest.raises(ValueError, match="x: expected shape"):
            sk.sparse_linear(torch.randn(3, 4), self.w, None, self.m)
        with pytest.raises(ValueError, match="mask: expected the weight's shape"):
            sk.sparse_linear(torch.randn(3, 5), self.w, None, torch.ones(5, 6, dtype=torch.bool))
        with pytest.raises(ValueError, match="grad_mask: expected the weight's shape"):
            sk.sparse_linear(torch.randn(3, 5), self.w, None, self.m, torch.ones(6, 4, dtype=torch.bool))
        with pytest.raises(ValueError, match="bias: expected shape"):
            sk.sparse_linear(torch.randn(3, 5), self.w, torch.randn(5), self.m)
        with pytest.raises(ValueError, match="weight: expected a 2-D"):
            sk.sparse_linear(torch.randn(3, 5), torch.randn(6, 5, 1), None, self.m)

    def test_dtypes(self):
        with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
            sk.sparse_linear(torch.randn(3, 5, dtype=torch.float64), self.w, None, self.m)
        with pytest.raises(TypeError, match="mask: expected dtype torch.bool"):
            sk.sparse_linear(torch.randn(3, 5), self.w, None, self.m.float())
        with pytest.raises(TypeError, match="weight: expected a floating dtype"):
            sk.sparse_linear(torch.randn(3, 5), torch.ones(6, 5, dtype=torch.int64), None, self.m)
        with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
            sk.sparse_linear([[1.0] * 5], self.w, None, self.m)

    def test_device(self):
        meta_x = torch.empty(3, 5, device="meta")
        with pytest.raises(ValueError, match="x: expected a tensor on cpu"):
            sk.sparse_linear(meta_x, self.w, None, self.m)
        with pytest.raises(ValueError, match="mask: expected a tensor on cpu"):
            sk.sparse_linear(torch.randn(3, 5), self.w, None, torch.ones(6, 5, dtype=torch.bool, device="meta"))

    def test_layout_and_block(self):
        with pytest.raises(ValueError, match="layout"):
            sk.sparse_linear(torch.randn(3, 5), self.w, None, self.m, layout="csr")
        with pytest.raises(ValueError, match="block_size"):
            sk.sparse_linear(torch.randn(3, 5), self.w, None, self.m, layout="block", block_size=12)
        with pytest.raises(ValueError, match="block_size: required"):
            sk.sparse_linear(torch.randn(3, 5), self.w, None, self.m, layout="block")

    def test_conv_args(self):
        w = torch.randn(4, 3, 3, 3)
        m = torch.ones_like(w, dtype=torch.bool)
        with pytest.raises(ValueError, match="x: expected 3 input channels"):
            sk.sparse_conv2d(torch.randn(1, 4, 5, 5), w, None, m)
        with pytest.raises(ValueError, match="stride"):
            sk.sparse_conv2d(torch.randn(1, 3, 5, 5), w, None, m, None, 0)
        with pytest.raises(ValueError, match="padding"):
            sk.sparse_conv2d(torch.randn(1, 3, 5, 5), w, None, m, None, 1, "full")
        with pytest.raises(ValueError, match="x: spatial size"):
            sk.sparse_conv2d(torch.randn(1, 3, 2, 2), w, None, m)
        with pytest.raises(ValueError, match="x: expected a"):
            sk.sparse_conv2d(torch.randn(3, 5), w, None, m)
        with pytest.raises(ValueError, match="groups"):
            sk.sparse_conv2d(torch.randn(1, 3, 5, 5), w, None, m, None, 1, 0, 1, 3)

    def test_sparsity_range(self):
        for bad in (1.0, -0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match="sparsity"):
                sk.SparseLinear(4, 4, sparsity=bad)
        with pytest.raises(TypeError, match="sparsity"):
            sk.SparseLinear(4, 4, sparsity="0.5")


def test_padding_same_and_valid():
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64)
    for k, d in ((3, 1), (4, 1), (3, 2), (2, 3)):
        w = torch.randn(3, 2, k, k, dtype=torch.float64)
        m = make_mask(w.shape, "random", 0.6)
        for pad in ("same", "valid"):
            y = sk.sparse_conv2d(x, w, None, m, None, 1, pad, d, **REF)
            assert_close(y, F.conv2d(x, w * m, None, 1, pad, d))
