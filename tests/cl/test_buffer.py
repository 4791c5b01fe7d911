"""Reservoir buffer: fills in order, keeps each example with probability size/seen, repeatable."""

import pytest
import torch

from sparsekern_cl.buffer import ReservoirBuffer


def _stream(buf, n, batch=7):
    for s in range(0, n, batch):
        ids = torch.arange(s, min(s + batch, n))
        buf.add(ids.view(-1, 1).float(), ids, logits=ids.view(-1, 1).float() * 2, task=s // 50)


def test_fills_in_order_then_keeps_size():
    buf = ReservoirBuffer(20, seed=0)
    _stream(buf, 15)
    assert len(buf) == 15 and buf.seen == 15
    assert buf.y[:15].tolist() == list(range(15))
    _stream(buf, 200)
    assert len(buf) == 20 and buf.seen == 215
    # inputs, labels, logits and task ids stay aligned slot by slot
    assert torch.equal(buf.x.view(-1).long(), buf.y)
    assert torch.equal(buf.logits.view(-1), buf.x.view(-1) * 2)


def test_same_seed_same_contents_different_seed_differs():
    a, b, c = ReservoirBuffer(30, seed=5), ReservoirBuffer(30, seed=5), ReservoirBuffer(30, seed=6)
    for buf in (a, b, c):
        _stream(buf, 500)
    assert torch.equal(a.y, b.y) and torch.equal(a.task, b.task)
    assert not torch.equal(a.y, c.y)
    assert torch.equal(a.sample(10)[1], b.sample(10)[1])


def test_reservoir_inclusion_is_uniform():
    # each of the 500 stream positions ends in a 50-slot buffer with probability 0.1
    n, size, runs = 500, 50, 120
    counts = torch.zeros(n)
    for seed in range(runs):
        buf = ReservoirBuffer(size, seed=seed)
        _stream(buf, n, batch=50)
        counts[buf.y] += 1
    per_bin = counts.view(10, 50).sum(1) / (runs * 50)  # inclusion rate of each tenth of the stream
    assert torch.allclose(per_bin, torch.full((10,), size / n), atol=0.02), per_bin
    assert counts.sum() == runs * size


def test_sample_without_replacement_and_state_roundtrip():
    buf = ReservoirBuffer(40, seed=1)
    _stream(buf, 100)
    x, y, logits, task = buf.sample(40)
    assert len(set(y.tolist())) == 40
    x, y, logits, task = buf.sample(100)  # more than stored: all of them
    assert y.numel() == 40
    other = ReservoirBuffer(40, seed=99)
    other.load_state_dict(buf.state_dict())
    assert torch.equal(other.sample(8)[1], buf.sample(8)[1])  # generator state travels too


def test_empty_and_invalid():
    with pytest.raises(RuntimeError, match="empty"):
        ReservoirBuffer(5).sample(1)
    with pytest.raises(ValueError, match="buffer_size"):
        ReservoirBuffer(-1)
    z = ReservoirBuffer(0)
    _stream(z, 10)
    assert len(z) == 0 and z.is_empty()
