"""Reference models built from plain ``nn.Linear`` / ``nn.Conv2d`` layers: an MLP and ResNet-18.

They are dense PyTorch models; :func:`sparsekern.sparsify_` turns them into sparse ones.  The
continual-learning layer (:mod:`sparsekern_cl.backbones`), the benchmark suite
(:mod:`sparsekern.bench`) and the tests all use these definitions, so a speed measured on "the
ResNet-18" is a speed of the network the CL methods train.

Both keep their classifier as one linear layer named ``head`` and list in :meth:`default_dense`
the layers that sparse training conventionally leaves dense.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "BasicBlock", "ResNet18"]

# name -> (module for the residual blocks, function for the plain layers)
_ACTIVATIONS = {"relu": (nn.ReLU, F.relu), "gelu": (nn.GELU, F.gelu)}


class MLP(nn.Module):
    """Flatten, then the hidden layers, then the linear classifier ``head``.

    Plain (the default, the continual-learning MLP such as 784-100-100-10): layers ``fc1``,
    ``fc2``, ... of widths ``hidden``, each followed by the activation.  ``residual=True`` makes
    a transformer-style feed-forward stack instead: hidden width ``h`` becomes a block
    ``block1``, ``block2``, ... computing ``x + Linear(h -> d)(act(Linear(d -> h)(x)))``, so the
    width ``d`` of the flattened input is kept up to the head.

    Args:
        input_shape: shape of one example (it is flattened), e.g. ``(1, 28, 28)`` or ``(768,)``.
        hidden: hidden widths, at least one, each positive.
        n_classes: outputs of the head.
        activation: ``"relu"`` or ``"gelu"``.
        residual: the feed-forward stack described above.

    Example:
        >>> MLP((1, 28, 28), (100, 100), 10)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        hidden: Sequence[int],
        n_classes: int,
        *,
        activation: str = "relu",
        residual: bool = False,
    ) -> None:
        super().__init__()
        if not hidden or any(int(h) < 1 for h in hidden):
            raise ValueError(f"hidden: expected a non-empty list of positive widths, got {hidden!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation: expected one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        width = math.prod(input_shape)
        self.n_hidden = len(hidden)
        self.residual = residual
        act_module, self._act = _ACTIVATIONS[activation]
        for i, h in enumerate(hidden):
            if residual:
                block = nn.Sequential(nn.Linear(width, int(h)), act_module(), nn.Linear(int(h), width))
                self.add_module(f"block{i + 1}", block)
            else:
                self.add_module(f"fc{i + 1}", nn.Linear(width, int(h)))
                width = int(h)
        self.head = nn.Linear(width, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the head, ``[N, width]``."""
        x = x.flatten(1)
        for i in range(self.n_hidden):
            if self.residual:
                x = x + getattr(self, f"block{i + 1}")(x)
            else:
                x = self._act(getattr(self, f"fc{i + 1}")(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def default_dense(self) -> tuple[str, ...]:
        """Layers kept dense by sparse training: the classifier."""
        return ("head",)


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 convs with batch norm, and a 1x1 projection shortcut when
    the stride or the width changes."""

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
    """ResNet-18 as in the continual-learning literature (GEM, DER): a 3x3 stem with stride 1, no
    max-pool, four stages of two :class:`BasicBlock` of widths ``nf, 2nf, 4nf, 8nf``, global
    average pooling and the linear ``head``.

    Args:
        n_classes: outputs of the head.
        nf: width of the first stage: 64 is the full network (about 11 M parameters), 20 the
            reduced one.
        in_channels: channels of the input images.

    Example:
        >>> ResNet18(10, nf=20)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, n_classes: int, nf: int = 20, in_channels: int = 3) -> None:
        super().__init__()
        if int(nf) < 1:
            raise ValueError(f"nf: expected a positive width, got {nf!r}")
        nf = int(nf)
        self.conv1 = nn.Conv2d(in_channels, nf, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        cin = nf
        for i, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2))):
            blocks = []
            for s in (stride, 1):
                blocks.append(BasicBlock(cin, nf * mult, s))
                cin = nf * mult
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.head = nn.Linear(cin, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features, ``[N, 8 nf]``."""
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(4):
            out = getattr(self, f"layer{i + 1}")(out)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def default_dense(self) -> tuple[str, ...]:
        """Layers kept dense by sparse training: the stem (3 input channels) and the classifier."""
        return ("conv1", "head")
