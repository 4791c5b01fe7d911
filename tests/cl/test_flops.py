"""Training FLOPs on small networks against hand computation; memory footprint; model capacity."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern import SparseConv2d, SparseLinear
from sparsekern.testing import make_mask
from sparsekern_cl.flops import FlopCounter, memory_footprint, model_capacity


def _mask(shape, n_keep):
    m = torch.zeros(shape, dtype=torch.bool)
    m.view(-1)[torch.randperm(m.numel())[:n_keep]] = True
    return m


def _mlp():
    # 8 -> 6 -> 4; layer 1 keeps 12 of 48 weights, layer 2 keeps 6 of 24 and learns 3 of them
    l1 = SparseLinear(8, 6, mask=_mask((6, 8), 12), backend="reference")
    m2 = _mask((4, 6), 6)
    l2 = SparseLinear(6, 4, mask=m2, backend="reference")
    g2 = m2.clone()
    g2.view(-1)[torch.nonzero(m2.view(-1)).flatten()[:3]] = False
    l2.set_grad_mask(g2)
    return nn.Sequential(l1, nn.ReLU(), l2)


def test_one_training_step_matches_hand_count():
    model = _mlp()
    counter = FlopCounter(model)
    counter.active = True
    x, y = torch.randn(5, 8), torch.randint(0, 4, (5,))
    F.cross_entropy(model(x), y).backward()
    n = 5
    fwd = 2 * n * (12 + 6)  # 2 * rows * nnz(W) per layer
    dx = 2 * n * 6  # only layer 2: the network input needs no gradient
    dw = 2 * n * (12 + 3)  # 2 * rows * nnz(G)
    assert counter.totals == pytest.approx({"forward": fwd, "input_grad": dx, "weight_grad": dw})
    dense_fwd, dense_dx, dense_dw = 2 * n * (48 + 24), 2 * n * 24, 2 * n * (48 + 24)
    assert counter.dense_totals == pytest.approx(
        {"forward": dense_fwd, "input_grad": dense_dx, "weight_grad": dense_dw}
    )
    assert counter.total == pytest.approx(fwd + dx + dw)


def test_extra_passes_forward_only_and_inactive():
    model = _mlp()
    counter = FlopCounter(model)
    x = torch.randn(3, 8)
    model(x)  # inactive: evaluation is not counted
    assert counter.total == 0
    counter.active = True
    with torch.no_grad():
        model(x)  # a selection pass: forward only
    assert counter.total == pytest.approx(2 * 3 * 18)
    # SAM-style: two forward/backward passes on the same batch count twice
    before = counter.total
    for _ in range(2):
        model(x).sum().backward()
    one = 2 * 3 * 18 + 2 * 3 * 6 + 2 * 3 * 15
    assert counter.total - before == pytest.approx(2 * one)


def test_mask_change_is_seen():
    model = _mlp()
    counter = FlopCounter(model)
    counter.active = True
    model(torch.randn(1, 8))
    model[0].set_mask(torch.ones(6, 8, dtype=torch.bool))  # in place: version counter moves
    model(torch.randn(1, 8))
    assert counter.totals["forward"] == pytest.approx(2 * (12 + 6) + 2 * (48 + 6))


def test_conv_and_frozen_weights():
    conv = SparseConv2d(
        2, 3, 3, padding=1, bias=False, mask=make_mask((3, 2, 3, 3), "random", 0.5), backend="reference"
    )
    nnz = int(conv.weight_mask.sum())
    model = nn.Sequential(nn.Conv2d(1, 2, 1), conv)
    model[0].weight.requires_grad_(False)  # frozen first layer: no weight gradient there
    model[0].bias.requires_grad_(False)
    counter = FlopCounter(model)
    counter.active = True
    model(torch.randn(2, 1, 4, 4)).sum().backward()
    pos = 2 * 4 * 4  # N * H_out * W_out
    assert counter.totals["forward"] == pytest.approx(2 * pos * 2 * 1 + 2 * pos * nnz)
    assert counter.totals["input_grad"] == pytest.approx(0.0)  # conv1's input: a frozen layer's output
    assert counter.totals["weight_grad"] == pytest.approx(2 * pos * nnz)
    assert counter.dense_totals["forward"] == pytest.approx(2 * pos * 2 + 2 * pos * 54)


def test_dense_layers_count_full():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    counter = FlopCounter(model)
    counter.active = True
    model(torch.randn(7, 4)).sum().backward()
    assert counter.total == pytest.approx(counter.dense_total)
    assert counter.total == pytest.approx(2 * 7 * (12 + 6) + 2 * 7 * 6 + 2 * 7 * 18)
    snap = counter.snapshot()
    other = FlopCounter(model)
    other.load_snapshot(snap)
    assert other.total == counter.total


def test_memory_footprint_and_capacity():
    model = _mlp()
    fp = memory_footprint(model, (8,), batch_rows=10)
    # weights: 12 + 6 in-mask + biases 6 + 4; gradients: 12 + 3 + 10; activations 10 * (6 + 4)
    assert fp["weights_bytes"] == 4 * (18 + 10)
    assert fp["grads_bytes"] == 4 * (15 + 10)
    assert fp["activations_bytes"] == 4 * 100
    assert fp["dense_total_bytes"] == 4 * ((72 + 10) * 2 + 100)
    assert model_capacity(0.0, 0) == 1.0
    assert model_capacity(0.9, 1) == pytest.approx(0.1 + 0.25 / 32)
    assert model_capacity(0.8, 5, gamma=0.75) == pytest.approx(0.2 + 0.25 * 5 / 32)
    with pytest.raises(ValueError, match="sparsity"):
        model_capacity(1.0, 1)
