"""The mask updates SparCL, DST and EsaCL share: pick, move_connections, reset_optimizer_state."""

import pytest
import torch

import sparsekern
from sparsekern_cl.methods.masking import move_connections, pick, reset_optimizer_state


def _b(*bits):
    return torch.tensor(bits, dtype=torch.bool)


def test_pick_by_score_breaks_ties_by_index_without_a_generator():
    cand = _b(1, 1, 1, 1, 0, 1)
    score = torch.tensor([2.0, 1.0, 1.0, 3.0, 0.0, 1.0])
    assert torch.equal(pick(cand, 2, score, largest=False), _b(0, 1, 1, 0, 0, 0))  # lowest; ties: index order
    assert torch.equal(pick(cand, 2, score), _b(1, 0, 0, 1, 0, 0))  # highest
    assert torch.equal(pick(cand, 9, score), cand)  # more than there are: all candidates
    assert not pick(cand, 0, score).any() and not pick(cand, -3, score).any()


def test_pick_with_a_generator_breaks_ties_at_random_and_is_seeded():
    cand = torch.ones(50, dtype=torch.bool)
    score = torch.zeros(50)
    a = pick(cand, 5, score, generator=torch.Generator().manual_seed(1))
    b = pick(cand, 5, score, generator=torch.Generator().manual_seed(1))
    c = pick(cand, 5, score, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c) and int(a.sum()) == 5
    # the shuffled order first, the stable ranking second: equal scores keep the drawn order
    order = torch.randperm(50, generator=torch.Generator().manual_seed(1))[:5]
    assert torch.equal(a.nonzero().flatten(), order.sort().values)


def test_pick_uniform_draws_only_when_it_chooses():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert not pick(torch.zeros(8, dtype=torch.bool), 3, generator=g).any()
    assert not pick(torch.ones(8, dtype=torch.bool), 0, generator=g).any()
    assert torch.equal(g.get_state(), state)
    got = pick(_b(1, 0, 1, 1, 0, 1, 1), 3, generator=g)
    assert int(got.sum()) == 3 and not (got & _b(0, 1, 0, 0, 1, 0, 0)).any()


def test_pick_with_topk_and_2d_shapes():
    cand = torch.tensor([[True, False, True], [True, True, False]])
    score = torch.tensor([[5.0, 9.0, 1.0], [4.0, 3.0, 8.0]])
    assert torch.equal(pick(cand, 2, score, stable=False), torch.tensor([[True, False, False], [True, False, False]]))
    assert torch.equal(
        pick(cand, 2, score, largest=False, stable=False), torch.tensor([[False, False, True], [False, True, False]])
    )
    assert torch.equal(pick(cand, 2, score), pick(cand, 2, score, stable=False))  # no ties: the same choice
    with pytest.raises(ValueError, match="score"):
        pick(cand, 1)
    with pytest.raises(ValueError, match="stable"):
        pick(cand, 1, score, generator=torch.Generator(), stable=False)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_reset_optimizer_state_clears_the_entries_only(opt):
    p = torch.nn.Parameter(torch.ones(2, 3))
    o = torch.optim.SGD([p], lr=0.1, momentum=0.9) if opt == "sgd" else torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones_like(p)
    o.step()
    where = torch.tensor([[True, False, False], [False, False, True]])
    reset_optimizer_state(o, p, where)
    for key, buf in o.state[p].items():
        if buf.shape == p.shape:
            assert torch.all(buf[where] == 0) and torch.all(buf[~where] != 0), key
        else:
            assert float(buf) == 1.0  # Adam's step count stays
    reset_optimizer_state(None, p, where)  # no optimizer yet: nothing to do


def test_move_connections_zeroes_what_moved_and_keeps_the_rest():
    layer = sparsekern.SparseLinear.from_dense(torch.nn.Linear(4, 2), mask=torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]]))
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 9.0).view(2, 4))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer.weight.grad = torch.ones_like(layer.weight)
    opt.step()
    w_before = layer.weight.detach().clone()
    drop = torch.tensor([[False, True, False, False], [False, False, False, False]])
    grow = torch.tensor([[False, False, False, True], [False, False, False, False]])
    new = move_connections(layer, drop, grow, optimizer=opt)
    assert torch.equal(new, layer.weight_mask)
    assert torch.equal(layer.weight_mask, torch.tensor([[1, 0, 0, 1], [1, 0, 1, 0]], dtype=torch.bool))
    assert layer.weight[0, 1] == 0 and layer.weight[0, 3] == 0  # dropped and grown start at zero
    assert layer.weight[0, 0] == w_before[0, 0] and layer.weight[1, 2] == w_before[1, 2]
    assert bool(layer.grad_mask[0, 3])  # grown: trainable
    buf = opt.state[layer.weight]["momentum_buffer"]
    assert buf[0, 1] == 0 and buf[0, 3] == 0 and buf[0, 0] != 0
    # zero_pruned=False keeps the values outside the mask (DST: other tasks' weights)
    with torch.no_grad():
        layer.weight[1, 3] = 7.0
    own = layer.weight_mask & ~drop
    move_connections(layer, torch.zeros_like(drop), torch.zeros_like(grow), grad_mask=own, zero_pruned=False)
    assert layer.weight[1, 3] == 7.0 and torch.equal(layer.grad_mask, own)
