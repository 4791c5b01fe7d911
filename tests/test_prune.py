"""torch.nn.utils.prune on the sparse layers: pruning updates their (boolean) masks in place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from sparsekern import SparseConv2d, SparseLinear, pattern_of


def _check_masks(layer, before: torch.Tensor) -> None:
    assert layer.weight_mask.dtype == torch.bool and layer.grad_mask.dtype == torch.bool
    assert not (layer.weight_mask & ~before).any(), "pruning must not regrow connections"
    assert not (layer.grad_mask & ~layer.weight_mask).any()


def test_l1_unstructured_then_remove_on_a_sparse_linear():
    layer = SparseLinear(32, 16, sparsity=0.5)
    buf = layer.weight_mask
    before = buf.clone()
    pattern_of(buf)  # metadata cached for the old mask
    prune.l1_unstructured(layer, "weight", amount=0.8)
    assert layer.weight_mask is buf  # written in place: caches, DDP and compiled graphs see it
    _check_masks(layer, before)
    assert layer.weight_mask.sum() == round(0.2 * buf.numel())
    assert pattern_of(buf).nnz() == int(buf.sum())  # the cached metadata was invalidated

    x = torch.randn(4, 32)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, layer.weight_orig.detach() * layer.weight_mask, layer.bias))
    y.sum().backward()
    assert not layer.weight_orig.grad[~layer.grad_mask].any()

    kept = layer.weight_mask.clone()
    prune.l1_unstructured(layer, "weight", amount=0.5)  # iterative: a PruningContainer
    _check_masks(layer, kept)
    prune.remove(layer, "weight")
    assert isinstance(layer.weight, nn.Parameter) and layer.weight_mask is buf
    assert sorted(layer.state_dict()) == ["bias", "grad_mask", "weight", "weight_mask"]
    assert not layer.weight[~layer.weight_mask].any()
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight.detach() * layer.weight_mask, layer.bias))


def test_global_unstructured_composes_with_the_layers_masks():
    model = nn.Sequential(SparseConv2d(3, 8, 3, sparsity=0.5), nn.Flatten(), SparseLinear(8 * 4 * 4, 10, sparsity=0.3))
    layers = [model[0], model[2]]
    before = [m.weight_mask.clone() for m in layers]
    params = [(m, "weight") for m in layers]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.8)
    # the layers' masks are prune's starting point: 80 % of the remaining connections go
    remaining = sum(int(b.sum()) for b in before)
    assert sum(int(m.weight_mask.sum()) for m in layers) == remaining - round(0.8 * remaining)
    for m, b in zip(layers, before):
        _check_masks(m, b)
    out = model(torch.randn(2, 3, 6, 6))
    out.sum().backward()
    for m in layers:
        prune.remove(m, "weight")
        assert m.weight_mask.dtype == torch.bool and isinstance(m.weight, nn.Parameter)
    model(torch.randn(2, 3, 6, 6)).sum().backward()


def test_prune_keeps_frozen_connections_frozen():
    layer = SparseLinear(16, 8)
    g = torch.rand(8, 16) > 0.5
    layer.set_grad_mask(g)
    prune.random_unstructured(layer, "weight", amount=0.5)
    assert torch.equal(layer.grad_mask, g & layer.weight_mask)


def test_unstructured_pruning_of_a_block_layer_is_refused_and_rolled_back():
    layer = SparseLinear(32, 32, sparsity=0.5, layout="block", block_size=16)
    with pytest.raises(ValueError, match="not constant"):
        prune.l1_unstructured(layer, "weight", amount=0.7)
    assert isinstance(layer.weight, nn.Parameter) and "weight_orig" not in dict(layer.named_parameters())
    assert layer.weight_mask.dtype == torch.bool
    layer(torch.randn(2, 32))


def test_set_mask_on_a_pruned_layer_reaches_its_forward():
    layer = SparseLinear(16, 8)
    prune.l1_unstructured(layer, "weight", amount=0.5)
    new = torch.rand(8, 16) > 0.7
    layer.set_mask(new)
    x = torch.randn(3, 16)
    assert torch.equal(layer.weight_mask, new)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight_orig.detach() * new, layer.bias))
