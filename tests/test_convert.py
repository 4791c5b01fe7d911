"""Mask initialisers and sparsify_ on a small ResNet."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern import masks
from sparsekern.convert import skip_first_and_last
from sparsekern.models import BasicBlock


class TinyResNet(nn.Module):
    def __init__(self, nf=8, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, nf, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        self.layer1 = BasicBlock(nf, nf, 1)
        self.layer2 = BasicBlock(nf, 2 * nf, 2)
        self.layer3 = BasicBlock(2 * nf, 4 * nf, 2)
        self.fc = nn.Linear(4 * nf, classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _overall_density(model):
    mods = [m for _, m in sk.sparse_modules(model)]
    return sum(int(m.weight_mask.sum()) for m in mods) / sum(m.weight_mask.numel() for m in mods)


@pytest.mark.parametrize("layout,block", [("unstructured", None), ("block", 16)])
def test_random_and_magnitude_masks(layout, block):
    shape = (40, 33)
    m = masks.random_mask(shape, 0.75, layout=layout, block_size=block, generator=torch.Generator().manual_seed(0))
    m2 = masks.random_mask(shape, 0.75, layout=layout, block_size=block, generator=torch.Generator().manual_seed(0))
    assert m.dtype == torch.bool and m.shape == shape and torch.equal(m, m2)
    w = torch.randn(shape)
    mm = masks.magnitude_mask(w, 0.75, layout=layout, block_size=block)
    if layout == "unstructured":
        assert int(mm.sum()) == round(0.25 * w.numel())
        assert w.abs()[mm].min() >= w.abs()[~mm].max()
    else:
        assert torch.equal(sk.formats.expand_block_mask(sk.formats.block_mask_of(mm, 16), (16, 16), shape), mm)


def test_magnitude_keeps_at_least_one_and_exact_counts():
    w = torch.randn(3, 3)
    assert int(masks.magnitude_mask(w, 0.99).sum()) == 1
    assert int(masks.magnitude_mask(w, 0.0).sum()) == 9
    w = torch.randn(10, 10)
    assert int(masks.magnitude_mask(w, 0.9).sum()) == 10


def test_erk_densities_match_budget_and_order():
    shapes = [(16, 3, 3, 3), (32, 16, 3, 3), (64, 32, 3, 3), (10, 64)]
    d = masks.erk_densities(shapes, 0.9)
    n = [math.prod(s) for s in shapes]
    assert abs(sum(di * ni for di, ni in zip(d, n)) / sum(n) - 0.1) < 1e-9
    assert all(0 < di <= 1 for di in d)
    assert d[1] > d[2]  # larger layers are sparser
    d = masks.erk_densities(shapes, 0.5)
    assert d[0] == 1.0 and d[3] == 1.0  # the small layers would exceed 1 and are kept dense
    assert abs(sum(di * ni for di, ni in zip(d, n)) / sum(n) - 0.5) < 1e-9
    assert d[1] / d[2] == pytest.approx((54 / 4608) / (102 / 18432))
    assert masks.uniform_densities(shapes, 0.8) == [pytest.approx(0.2)] * 4


def test_global_magnitude_threshold():
    w1 = torch.full((4, 4), 10.0)
    w2 = torch.full((4, 4), 0.1)
    m1, m2 = masks.global_magnitude_masks([w1, w2], 0.5)
    assert m1.all() and not m2.any()
    b1, b2 = masks.global_magnitude_masks(
        [torch.randn(32, 32) * 5, torch.randn(32, 32)], 0.5, layout="block", block_size=16
    )
    assert int(b1.sum()) + int(b2.sum()) == 1024


def test_check_sparsity_errors():
    for bad in (1.0, -0.01, 2):
        with pytest.raises(ValueError, match="sparsity: expected a value in \\[0, 1\\)"):
            masks.check_sparsity(bad)
    with pytest.raises(ValueError, match="layout"):
        masks.random_mask((4, 4), 0.5, layout="diag")


@pytest.mark.parametrize(
    "config",
    [
        sk.SparsityConfig(0.9),
        sk.SparsityConfig(0.8, distribution="erk"),
        sk.SparsityConfig(0.9, method="global_magnitude"),
        sk.SparsityConfig(0.75, method="random", seed=3),
        sk.SparsityConfig(0.75, layout="block", block_size=16),
    ],
    ids=["uniform", "erk", "global", "random", "block16"],
)
def test_sparsify_small_resnet(config):
    torch.manual_seed(0)
    model = TinyResNet()
    x = torch.randn(2, 3, 16, 16)
    ref = TinyResNet()
    ref.load_state_dict(model.state_dict())
    out = sk.sparsify_(model, config, filter_fn=skip_first_and_last(model))
    assert out is model
    names = dict(sk.sparse_modules(model))
    assert "conv1" not in names and "fc" not in names  # first conv and classifier stay dense
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    assert isinstance(model.layer2.shortcut[0], sk.SparseConv2d)
    assert len(names) == 8  # 6 block convs + 2 shortcuts
    if config.layout == "unstructured":
        assert abs(_overall_density(model) - (1 - config.sparsity)) < 0.01
    # converted model computes the dense model with W⊙M
    for name, mod in names.items():
        ref.get_submodule(name).weight.data.mul_(mod.weight_mask)
    model.eval(), ref.eval()
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    # and it trains
    model.train()
    model(x).sum().backward()
    assert all(m.weight.grad is not None for m in names.values())


def test_sparsify_keep_dense_and_float_config():
    model = TinyResNet()
    sk.sparsify_(model, 0.5)
    assert isinstance(model.conv1, sk.SparseConv2d) and isinstance(model.fc, sk.SparseLinear)
    model = TinyResNet()
    sk.sparsify_(model, sk.SparsityConfig(0.5, keep_dense=("conv1", "layer1.conv2")))
    assert type(model.conv1) is nn.Conv2d and type(model.layer1.conv2) is nn.Conv2d
    with pytest.raises(ValueError, match="keep_dense"):
        sk.sparsify_(TinyResNet(), sk.SparsityConfig(0.5, keep_dense=("nope",)))
    with pytest.raises(TypeError, match="config"):
        sk.sparsify_(TinyResNet(), "0.5")
    with pytest.raises(ValueError, match="distribution"):
        sk.SparsityConfig(0.5, distribution="gaussian")
    with pytest.raises(ValueError, match="sparsity"):
        sk.SparsityConfig(1.0)


def test_densify_roundtrip():
    model = TinyResNet()
    sk.sparsify_(model, 0.7)
    x = torch.randn(1, 3, 8, 8)
    model.eval()
    y = model(x)
    sk.densify_(model)
    assert not sk.sparse_modules(model)
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
