"""Bad input to the modules: zero-size layers work like nn.Linear / nn.Conv2d (or raise naming
the argument), and a mask that is not boolean or 0/1 is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsekern as sk
from tests.support import BACKENDS, MARKS, Target

TARGETS = [pytest.param(n, marks=MARKS[n], id=n) for n in BACKENDS]
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")


def _grads(layer, x):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.sum().backward()
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("shape", [(0, 10), (10, 0), (0, 0)], ids=["in0", "out0", "both0"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
@pytest.mark.parametrize("name", TARGETS)
def test_zero_size_linear_works_like_nn_linear(name, shape, sparsity):
    dev = Target(name).device
    dense = nn.Linear(*shape).to(dev)
    layer = sk.SparseLinear.from_dense(dense, sparsity=sparsity, backend=name)
    x = torch.randn(3, shape[0], device=dev)
    for got, want in zip(_grads(layer, x), _grads(dense, x)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", TARGETS)
def test_conv_without_input_channels_gives_the_bias(name):
    dev = Target(name).device
    layer = sk.SparseConv2d(0, 4, 3, backend=name).to(dev)
    y, dx, dw, db = _grads(layer, torch.randn(2, 0, 5, 5, device=dev))
    torch.testing.assert_close(y, layer.bias.detach().view(1, 4, 1, 1).expand(2, 4, 3, 3))
    assert dx.shape == (2, 0, 5, 5) and dw.shape == (4, 0, 3, 3)
    torch.testing.assert_close(db, torch.full((4,), 18.0, device=dev))


def test_conv_without_output_channels_raises():
    with pytest.raises(ValueError, match="out_channels: expected an integer >= 1, got 0"):
        sk.SparseConv2d(3, 0, 3)


def test_set_mask_refuses_scores():
    layer = sk.SparseLinear(6, 4)
    scores = torch.rand(4, 6)
    with pytest.raises(ValueError, match="mask: expected a boolean or 0/1 tensor"):
        layer.set_mask(scores)
    with pytest.raises(ValueError, match="mask: expected a boolean or 0/1 tensor"):
        layer.set_mask((scores > 0.5).long() * 2)
    with pytest.raises(ValueError, match="grad_mask: expected a boolean or 0/1 tensor"):
        layer.set_mask(scores > 0.5, grad_mask=scores)
    with pytest.raises(ValueError, match="mask: expected a boolean or 0/1 tensor"):
        layer.set_grad_mask(torch.full((4, 6), float("nan")))
    assert bool(layer.weight_mask.all())  # nothing was written
    layer.set_mask((scores > 0.5).float())  # torch.nn.utils.prune's float 0/1 masks are fine
    assert torch.equal(layer.weight_mask, scores > 0.5)
