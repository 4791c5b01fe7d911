"""Backbones: an MLP and the reduced/full ResNet-18 of the continual-learning literature.

Both are built from ``nn.Linear`` / ``nn.Conv2d`` and turned into sparse networks with
:func:`sparsekern.sparsify_`, so a dense run uses plain PyTorch layers and a sparse run uses
``SparseLinear`` / ``SparseConv2d`` on the sparse kernels.  The classifier is one linear layer
``head`` over all classes; Task-IL reads a task's slice of its logits, and the multi-head mode
trains each slice as a separate head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import sparsekern

__all__ = ["MLP", "ResNet18", "build_backbone", "sparsify_backbone", "BACKBONES"]

BACKBONES = ("mlp", "resnet18")


class MLP(nn.Module):
    """Flatten, then ``len(hidden)`` ReLU layers, then the linear ``head`` (e.g. 784-100-100-10).

    Layers are named ``fc1``, ``fc2``, ... and ``head``.
    """

    def __init__(self, input_shape, hidden, n_classes: int) -> None:
        super().__init__()
        width = math.prod(input_shape)
        for i, h in enumerate(hidden):
            self.add_module(f"fc{i + 1}", nn.Linear(width, int(h)))
            width = int(h)
        self.n_hidden = len(hidden)
        self.head = nn.Linear(width, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(self.n_hidden):
            x = F.relu(getattr(self, f"fc{i + 1}")(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def default_dense(self) -> tuple[str, ...]:
        return ("head",)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 as in GEM / DER: 3x3 stem with stride 1, no max-pool, stages of width nf..8nf.

    ``nf=64`` is the full network (about 11 M parameters), ``nf=20`` the reduced one.
    """

    def __init__(self, n_classes: int, nf: int = 20, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, nf, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        cin = nf
        stages = []
        for i, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2))):
            blocks = []
            for s in (stride, 1):
                blocks.append(BasicBlock(cin, nf * mult, s))
                cin = nf * mult
            stages.append(nn.Sequential(*blocks))
            self.add_module(f"layer{i + 1}", stages[-1])
        self.head = nn.Linear(cin, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(4):
            out = getattr(self, f"layer{i + 1}")(out)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def default_dense(self) -> tuple[str, ...]:
        return ("conv1", "head")


def build_backbone(name: str, input_shape, n_classes: int, *, hidden=(100, 100), nf: int = 20) -> nn.Module:
    """A dense backbone: ``"mlp"`` (``hidden`` widths) or ``"resnet18"`` (width ``nf``)."""
    if name == "mlp":
        if not hidden or any(int(h) < 1 for h in hidden):
            raise ValueError(f"mlp_hidden: expected a non-empty list of positive widths, got {hidden!r}")
        return MLP(input_shape, hidden, n_classes)
    if name == "resnet18":
        if int(nf) < 1:
            raise ValueError(f"nf: expected a positive width, got {nf!r}")
        return ResNet18(n_classes, int(nf), in_channels=int(input_shape[0]))
    raise ValueError(f"backbone: expected one of {BACKBONES}, got {name!r}")


def sparsify_backbone(
    model: nn.Module,
    sparsity: float,
    *,
    distribution: str = "uniform",
    init: str = "magnitude",
    layout: str = "unstructured",
    block_size=None,
    backend: str | None = None,
    keep_dense="auto",
    seed: int = 0,
    rescale: bool = True,
) -> nn.Module:
    """Swap the backbone's layers for sparse ones at ``sparsity`` (in place), keeping ``keep_dense`` dense.

    ``keep_dense="auto"`` keeps the backbone's defaults dense (the MLP's head; the ResNet's stem
    and head, as SparCL does).  ``sparsity == 0`` leaves the model as it is (plain PyTorch layers).

    ``rescale``: multiply each sparse layer's kept weights by ``sqrt(sum w² / sum (w⊙M)²)`` so the
    layer's output has the variance of the dense initialisation; without it a 90 % sparse layer
    starts with activations (and gradients) about half as large per layer, which slows learning.
    """
    if sparsity == 0:
        return model
    if keep_dense == "auto":
        keep = tuple(model.default_dense()) if hasattr(model, "default_dense") else ()
    else:
        keep = tuple(keep_dense or ())
    cfg = sparsekern.SparsityConfig(
        sparsity=sparsity, distribution=distribution, method=init, layout=layout,
        block_size=block_size if layout == "block" else None, backend=backend, seed=seed, keep_dense=keep,
    )
    dense_sq = {n: m.weight.detach().pow(2).sum() for n, m in model.named_modules()
                if isinstance(m, (nn.Linear, nn.Conv2d))}
    sparsekern.sparsify_(model, cfg)
    if rescale:
        with torch.no_grad():
            for name, m in sparsekern.sparse_modules(model):
                kept = (m.weight * m.weight_mask).pow(2).sum()
                if kept > 0:
                    m.weight.mul_(torch.sqrt(dense_sq[name] / kept))
    return model
