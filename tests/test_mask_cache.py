"""Cached mask metadata never disagrees with the mask: writes behind the version counter
(``.data``, NumPy views) are caught by the content checksum under ``SPARSEKERN_CHECK_MASKS=1``
(which tests/conftest.py sets), ``set_mask`` / ``load_state_dict`` / ``invalidate`` always
invalidate, and a mask written between a forward and its backward makes the backward raise, on
every backend.  With the variable off, no checksum is computed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern import formats
from tests.support import BACKENDS, MARKS, Target

TARGETS = [pytest.param(n, marks=MARKS[n], id=n) for n in BACKENDS]


def _layer(name: str, conv: bool = False):
    dev = Target(name).device
    if conv:
        return sk.SparseConv2d(3, 4, 3, padding=1, sparsity=0.5, backend=name).to(dev), torch.randn(
            2, 3, 5, 5, device=dev
        )
    return sk.SparseLinear(8, 6, sparsity=0.5, backend=name).to(dev), torch.randn(4, 8, device=dev)


def _dense(layer, x):
    w = layer.weight.masked_fill(~layer.weight_mask, 0)
    if isinstance(layer, sk.SparseConv2d):
        return F.conv2d(x, w, layer.bias, layer.stride, layer.padding)
    return F.linear(x, w, layer.bias)


WRITES = {
    "data_fill": lambda m: m.data.fill_(True),
    "data_index": lambda m: m.data.__setitem__((0,), ~m.data[0]),
    "numpy": lambda m: m.numpy().__setitem__((0,), True),
}


@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv2d"])
@pytest.mark.parametrize("name", TARGETS)
def test_write_behind_the_counter_is_seen(name, conv, write):
    layer, x = _layer(name, conv)
    with torch.no_grad():
        layer.weight.normal_()  # weights outside the old mask are nonzero: a stale CSR shows
    layer(x)  # builds and caches the metadata
    version = layer.weight_mask._version
    if write == "numpy" and layer.weight_mask.device.type != "cpu":
        pytest.skip("NumPy views are CPU only")
    WRITES[write](layer.weight_mask)
    layer.grad_mask.copy_(layer.weight_mask)
    assert layer.weight_mask._version == version  # the write bypassed the counter
    torch.testing.assert_close(layer(x), _dense(layer, x))


@pytest.mark.parametrize("name", TARGETS)
def test_invalidate_without_checksums(name, monkeypatch):
    """With the variable off a write behind the counter needs invalidate(); then it is seen."""
    monkeypatch.delenv(formats.CHECK_VAR, raising=False)
    layer, x = _layer(name)
    with torch.no_grad():
        layer.weight.normal_()
    layer(x)
    layer.weight_mask.data.fill_(True)
    formats.invalidate(layer.weight_mask)
    layer.grad_mask.copy_(layer.weight_mask)
    torch.testing.assert_close(layer(x), _dense(layer, x))


def test_no_checksum_by_default(monkeypatch):
    """No O(numel) content pass per call when SPARSEKERN_CHECK_MASKS is off."""
    monkeypatch.delenv(formats.CHECK_VAR, raising=False)
    layer, x = _layer("reference")

    def boom(mask):
        raise AssertionError("mask_checksum ran with SPARSEKERN_CHECK_MASKS off")

    monkeypatch.setattr(formats, "mask_checksum", boom)
    for _ in range(2):
        layer(x).sum().backward()
    monkeypatch.setenv(formats.CHECK_VAR, "0")
    layer(x).sum().backward()


@pytest.mark.parametrize("how", ["set_mask", "set_grad_mask", "inplace", "data"])
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv2d"])
@pytest.mark.parametrize("name", TARGETS)
def test_mask_changed_between_forward_and_backward_raises(name, conv, how):
    layer, x = _layer(name, conv)
    y = layer(x)
    flipped = ~layer.weight_mask
    if how == "set_mask":
        layer.set_mask(flipped)
    elif how == "set_grad_mask":
        layer.set_grad_mask(torch.zeros_like(layer.grad_mask))
    elif how == "inplace":
        layer.weight_mask.copy_(flipped)
    else:  # behind the counter: the checksum catches it
        layer.weight_mask.data.copy_(flipped)
    with pytest.raises(RuntimeError, match="mask: changed between the forward and the backward"):
        y.sum().backward()


@pytest.mark.parametrize("name", TARGETS)
def test_load_state_dict_invalidates(name):
    layer, x = _layer(name)
    other, _ = _layer(name)
    with torch.no_grad():
        layer.weight.normal_()
    layer(x)
    sd = other.state_dict()
    sd["weight_mask"] = ~layer.weight_mask
    sd["grad_mask"] = sd["weight_mask"].clone()
    layer.load_state_dict(sd)
    torch.testing.assert_close(layer(x), _dense(layer, x))
    sd["weight_mask"] = layer.weight_mask.float() * 0.5  # a score tensor is not a mask
    with pytest.raises(RuntimeError, match="weight_mask: expected a boolean or 0/1 tensor"):
        layer.load_state_dict(sd)


def test_prune_buffer_replaced():
    """torch.nn.utils.prune replaces the mask buffer by a new tensor: a fresh cache."""
    layer, x = _layer("reference")
    layer(x)
    new = torch.rand_like(layer.weight) > 0.5
    layer.weight_mask = new  # what prune's setattr does
    layer.grad_mask = new.clone()
    torch.testing.assert_close(layer(x), _dense(layer, x))


def test_checksum_sees_each_entry():
    m = torch.zeros(3, 5, dtype=torch.bool)
    base = formats.mask_checksum(m)
    seen = set()
    for i in range(m.numel()):
        m.view(-1)[i] = True
        seen.add(formats.mask_checksum(m))
        m.view(-1)[i] = False
    assert base not in seen and len(seen) == m.numel()
    assert formats.mask_checksum(m) == base
