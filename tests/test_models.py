"""The shared models (sparsekern.models): the CL backbones' layer names, sizes and the bench's forms."""

from __future__ import annotations

import pytest
import torch

import sparsekern
import sparsekern_cl.backbones as backbones
from sparsekern.bench.providers import build_model
from sparsekern.models import MLP, BasicBlock, ResNet18


def test_cl_backbones_are_the_shared_models():
    assert backbones.MLP is MLP and backbones.ResNet18 is ResNet18 and backbones.BasicBlock is BasicBlock


def test_resnet18_names_and_size():
    full = ResNet18(10, nf=64)
    assert sum(p.numel() for p in full.parameters()) == 11_173_962  # the CL literature's ResNet-18
    keys = list(ResNet18(10, nf=4).state_dict())
    # checkpoints rely on these names
    assert keys[:2] == ["conv1.weight", "bn1.weight"] and keys[-2:] == ["head.weight", "head.bias"]
    assert "layer2.0.shortcut.0.weight" in keys and "layer1.0.shortcut.0.weight" not in keys
    assert ResNet18(10, nf=4).default_dense() == ("conv1", "head")
    assert ResNet18(5, nf=4, in_channels=1)(torch.zeros(2, 1, 8, 8)).shape == (2, 5)
    with pytest.raises(ValueError, match="nf"):
        ResNet18(10, nf=0)


def test_mlp_plain_and_residual():
    plain = MLP((1, 6, 6), (24, 12), 4)
    assert list(plain.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "head.weight", "head.bias"]
    assert plain(torch.randn(3, 1, 6, 6)).shape == (3, 4)
    res = MLP((16,), (32, 32), 3, activation="gelu", residual=True)
    assert [tuple(p.shape) for p in res.block1.parameters()] == [(32, 16), (32,), (16, 32), (16,)]
    assert res.head.in_features == 16 and res(torch.randn(2, 16)).shape == (2, 3)
    with pytest.raises(ValueError, match="hidden"):
        MLP((4,), (), 2)
    with pytest.raises(ValueError, match="activation"):
        MLP((4,), (4,), 2, activation="tanh")


def test_bench_models_keep_the_stem_and_head_dense():
    model, in_shape, keep = build_model("resnet18", 4)
    assert isinstance(model, ResNet18) and in_shape == (3, 32, 32) and keep == {"conv1", "head"}
    sparsekern.sparsify_(model, sparsekern.SparsityConfig(0.5, keep_dense=tuple(sorted(keep))))
    assert type(model.conv1) is torch.nn.Conv2d and type(model.head) is torch.nn.Linear
    mlp, in_shape, keep = build_model("mlp", 64)
    assert isinstance(mlp, MLP) and mlp.residual and in_shape == (32,) and keep == {"head"}
