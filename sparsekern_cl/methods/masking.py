"""Mask updates shared by the sparse methods: choosing entries, moving connections, optimizer state.

SparCL, DST and EsaCL all drop and grow connections of a sparse layer.  They choose *which* with
:func:`pick` (the ``k`` best candidates by a score, or ``k`` at random), change the layer with
:func:`move_connections` (dropped and grown weights start at zero) and clear the optimizer's
history of the moved entries with :func:`reset_optimizer_state`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["pick", "move_connections", "reset_optimizer_state"]


def pick(
    candidates: torch.Tensor,
    k: int,
    score: torch.Tensor | None = None,
    *,
    largest: bool = True,
    generator: torch.Generator | None = None,
    stable: bool = True,
) -> torch.Tensor:
    """Bool mask of ``min(k, #candidates)`` entries of ``candidates``: the best by ``score``, or uniform.

    Args:
        candidates: bool mask of the entries that may be chosen.
        k: how many to choose (``<= 0``: none).
        score: the ranking (same shape); ``None`` draws uniformly at random (needs ``generator``).
        largest: choose the highest scores (``False``: the lowest).
        generator: with a score, shuffles the candidates first, so equal scores are broken at
            random; without one, equal scores go in index order.  A draw is taken only when
            something is chosen.
        stable: ``False`` ranks with ``torch.topk`` instead of a stable sort: faster, but which of
            several equal scores at the boundary wins is up to the kernel.

    Raises:
        ValueError: neither ``score`` nor ``generator``, or ``stable=False`` without a score or
            with a generator.
    """
    if score is None and generator is None:
        raise ValueError("score: expected a ranking or a generator for a uniform choice, got neither")
    out = torch.zeros_like(candidates)
    if not stable:
        if score is None or generator is not None:
            raise ValueError("stable: False ranks by score alone; expected a score and no generator")
        k = max(0, min(int(k), int(candidates.sum())))
        if k == 0:
            return out
        fill = -math.inf if largest else math.inf
        s = score.reshape(-1).masked_fill(~candidates.reshape(-1), fill)
        out.view(-1)[torch.topk(s, k, largest=largest, sorted=False).indices] = True
        return out
    idx = torch.nonzero(candidates.reshape(-1)).flatten()
    k = min(int(k), idx.numel())
    if k <= 0:
        return out
    if generator is not None:
        idx = idx[torch.randperm(idx.numel(), generator=generator).to(idx.device)]
    if score is not None:
        # float64 keeps every float32/bf16 score distinct and in order; stable: ties keep the order above
        order = torch.sort(score.reshape(-1)[idx].double(), descending=largest, stable=True).indices
        idx = idx[order]
    out.view(-1)[idx[:k]] = True
    return out


def reset_optimizer_state(optimizer: torch.optim.Optimizer | None, param: torch.Tensor, where: torch.Tensor) -> None:
    """Zero the optimizer's per-entry state of ``param`` (momentum, Adam moments) at ``where``.

    A regrown weight starts with no history, and a dropped one must not drift back through its
    momentum.  Every state tensor of the parameter's shape is cleared (scalars such as Adam's
    ``step`` are left alone).
    """
    if optimizer is None:
        return
    for buf in optimizer.state.get(param, {}).values():
        if isinstance(buf, torch.Tensor) and buf.shape == param.shape:
            buf.masked_fill_(where, 0)


@torch.no_grad()
def move_connections(
    layer: nn.Module,
    drop: torch.Tensor,
    grow: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    grad_mask: torch.Tensor | None = None,
    zero_pruned: bool = True,
) -> torch.Tensor:
    """Remove ``drop`` from a sparse layer's weight mask and add ``grow``; returns the new mask.

    The dropped and grown weights are set to zero and their optimizer state cleared.
    ``grad_mask`` and ``zero_pruned`` go to the layer's ``set_mask`` (``None``: kept connections
    keep their gradient status, grown ones are trainable; ``zero_pruned=False`` keeps the values
    of weights outside the new mask, e.g. other tasks' weights in DST).
    """
    moved = drop | grow
    new = (layer.weight_mask & ~drop) | grow
    layer.weight.masked_fill_(moved, 0)
    layer.set_mask(new, grad_mask=grad_mask, zero_pruned=zero_pruned)
    reset_optimizer_state(optimizer, layer.weight, moved)
    return new
