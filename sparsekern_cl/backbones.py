"""Backbones: an MLP and the reduced/full ResNet-18 of the continual-learning literature.

The models are :class:`sparsekern.models.MLP` and :class:`sparsekern.models.ResNet18` (the
benchmark suite times the same definitions), re-exported here.  Both are built from
``nn.Linear`` / ``nn.Conv2d`` and turned into sparse networks with :func:`sparsekern.sparsify_`,
so a dense run uses plain PyTorch layers and a sparse run uses ``SparseLinear`` /
``SparseConv2d`` on the sparse kernels.  The classifier is one linear layer ``head`` over all
classes; Task-IL reads a task's slice of its logits, and the multi-head mode trains each slice as
a separate head.
"""

from __future__ import annotations

import torch
from torch import nn

import sparsekern
from sparsekern.models import MLP, BasicBlock, ResNet18

__all__ = ["MLP", "BasicBlock", "ResNet18", "build_backbone", "batchnormed_layers", "sparsify_backbone", "BACKBONES"]

BACKBONES = ("mlp", "resnet18")


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


def _last_linear(model: nn.Module) -> tuple[str, ...]:
    """The name of the model's last ``nn.Linear`` (its classifier, as a rule), or nothing."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return tuple(names[-1:])


def batchnormed_layers(model: nn.Module) -> set[str]:
    """Names of the ``nn.Linear`` / ``nn.Conv2d`` layers whose output feeds a batch norm directly.

    Read from the registration order (the way :class:`ResNet18` and most models are written): a
    layer counts when the next leaf module is a batch norm over its output channels.
    """
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    return {
        n
        for (n, m), (_, nxt) in zip(leaves, leaves[1:])
        if isinstance(m, (nn.Linear, nn.Conv2d))
        and isinstance(nxt, nn.modules.batchnorm._BatchNorm)
        and nxt.num_features == (m.out_features if isinstance(m, nn.Linear) else m.out_channels)
    }


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
    and head, as SparCL does; for a model without ``default_dense()``, its last ``nn.Linear``).  ``sparsity == 0`` leaves the model as it is (plain PyTorch layers).

    ``rescale``: multiply each sparse layer's kept weights by ``sqrt(sum w² / sum (w⊙M)²)`` so the
    layer's output has the variance of the dense initialisation; without it a 90 % sparse layer
    starts with activations (and gradients) about half as large per layer, which slows learning.
    Layers whose output goes straight into a batch norm (:func:`batchnormed_layers`) are not
    rescaled: the norm undoes any weight scale in the forward pass, and a larger weight only
    shrinks the gradient and the relative step (by the scale squared), i.e. lowers their
    effective learning rate (on ResNet-18 at 90 % that cost 8 Class-IL points, experiments/cl_r18.py).
    """
    if sparsity == 0:
        return model
    if keep_dense == "auto":
        keep = tuple(model.default_dense()) if hasattr(model, "default_dense") else _last_linear(model)
    else:
        keep = tuple(keep_dense or ())
    cfg = sparsekern.SparsityConfig(
        sparsity=sparsity,
        distribution=distribution,
        method=init,
        layout=layout,
        block_size=block_size if layout == "block" else None,
        backend=backend,
        seed=seed,
        keep_dense=keep,
    )
    dense_sq = {
        n: m.weight.detach().pow(2).sum() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    }
    normed = batchnormed_layers(model)
    sparsekern.sparsify_(model, cfg)
    if rescale:
        with torch.no_grad():
            for name, m in sparsekern.sparse_modules(model):
                if name in normed:
                    continue
                kept = (m.weight * m.weight_mask).pow(2).sum()
                if kept > 0:
                    m.weight.mul_(torch.sqrt(dense_sq[name] / kept))
    return model


def sparsify_from_config(model: nn.Module, cfg: dict, *, keep_dense=None) -> nn.Module:
    """:func:`sparsify_backbone` with a run configuration's sparsity keys (``keep_dense`` defaults to
    ``cfg["keep_dense"]``)."""
    return sparsify_backbone(
        model,
        cfg["sparsity"],
        distribution=cfg["sparse_distribution"],
        init=cfg["sparse_init"],
        layout=cfg["layout"],
        block_size=cfg["block_size"],
        backend=cfg["backend"],
        keep_dense=cfg["keep_dense"] if keep_dense is None else keep_dense,
        seed=cfg["seed"],
        rescale=cfg["sparse_rescale"],
    )
