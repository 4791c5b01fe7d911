"""Small models for the end-to-end benchmarks (plain ``nn`` modules; ``sparsify_`` converts them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "ResNet18", "MLP", "build_model"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
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
    """ResNet-18 as used in continual learning on 32×32 inputs: 3×3 stem, no max-pool.

    Args:
        num_classes: size of the classifier.
        nf: width of the first stage (64 is the full network, 20 the reduced one).
    """

    def __init__(self, num_classes: int = 10, nf: int = 64) -> None:
        super().__init__()
        if nf < 1:
            raise ValueError(f"nf: expected a positive width, got {nf!r}")
        self.conv1 = nn.Conv2d(3, nf, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        layers, cin = [], nf
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = nf * 2**i
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class MLP(nn.Module):
    """Transformer-style MLP block stack: ``768 -> hidden -> 768`` twice, then a classifier."""

    def __init__(self, num_classes: int = 10, hidden: int = 3072, dim: int = 768, blocks: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)) for _ in range(blocks)
        )
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = x + blk(x)
        return self.head(x)


def build_model(kind: str, width: int, num_classes: int = 10) -> tuple[nn.Module, tuple[int, ...], set[str]]:
    """``(model, input shape without batch, names of layers kept dense)``.

    The layers kept dense are the ones sparse training leaves dense by convention: the first
    (3 input channels) and the classifier.
    """
    if kind == "resnet18":
        return ResNet18(num_classes, width), (3, 32, 32), {"conv1", "linear"}
    if kind == "mlp":
        dim = 768 if width >= 768 else max(8, width // 2)
        return MLP(num_classes, width, dim), (dim,), {"head"}
    raise ValueError(f"kind: expected 'resnet18' or 'mlp', got {kind!r}")
