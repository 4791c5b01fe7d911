"""Parameter isolation shared by EsaCL and DST: parameters (or some of their entries) that must not move.

A sparse layer's frozen *weights* leave its gradient mask, so the kernels never compute their
gradient.  Everything else a method freezes (biases, normalisation layers, dense layers, the
head's rows of finished tasks) is held by :class:`FrozenEntries`: its gradient is zeroed after
the backward pass, and its values are restored after every optimizer step, so neither momentum
nor weight decay can move it.  :func:`freeze_norm_statistics` keeps BatchNorm running statistics
fixed while training (the layers run in eval mode).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FrozenEntries", "freeze_norm_statistics", "shared_parameter_names", "head_rows"]


class FrozenEntries:
    """Entries of a model's parameters kept at the values they had when frozen.

    Args:
        model: the model whose named parameters are frozen.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.where: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}

    def _params(self) -> dict[str, torch.Tensor]:
        return dict(self.model.named_parameters())

    @torch.no_grad()
    def freeze(self, name: str, where: torch.Tensor | None = None) -> None:
        """Freeze the entries ``where`` (all of them when ``None``) of parameter ``name`` at their current values."""
        p = self._params()[name]
        w = torch.ones_like(p, dtype=torch.bool) if where is None else where.to(p.device)
        old = self.where.get(name)
        if old is not None:
            keep = self.values[name]
            self.values[name] = torch.where(old, keep, p.detach())
            w = w | old
        else:
            self.values[name] = p.detach().clone()
        self.where[name] = w

    def mask_grads(self, named_grads) -> list:
        """``[(name, grad)]`` -> the gradients with the frozen entries zeroed (``None`` stays ``None``)."""
        out = []
        for name, g in named_grads:
            w = self.where.get(name)
            out.append(g if g is None or w is None else g.masked_fill(w, 0.0))
        return out

    @torch.no_grad()
    def zero_grads(self) -> None:
        """Zero the gradient of every frozen entry (before the optimizer step)."""
        params = self._params()
        for name, w in self.where.items():
            g = params[name].grad
            if g is not None:
                g.masked_fill_(w, 0.0)

    @torch.no_grad()
    def restore(self) -> None:
        """Put every frozen entry back to its frozen value (after the optimizer step)."""
        params = self._params()
        for name, w in self.where.items():
            p = params[name]
            p.copy_(torch.where(w, self.values[name], p))

    def state_dict(self) -> dict:
        return {"where": dict(self.where), "values": dict(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.where = dict(state.get("where", {}))
        self.values = dict(state.get("values", {}))


def freeze_norm_statistics(model: nn.Module) -> None:
    """Run every BatchNorm layer in eval mode, so training steps use and keep its running statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def shared_parameter_names(model: nn.Module, sparse_layers, head: str = "head") -> list[str]:
    """Names of the parameters every task shares: all but the sparse layers' weights and the head's."""
    sparse = {f"{n}.weight" if n else "weight" for n in sparse_layers}
    return [n for n, _ in model.named_parameters() if n not in sparse and not n.startswith(head + ".")]


def head_rows(model: nn.Module, lo: int, hi: int, head: str = "head") -> dict[str, torch.Tensor]:
    """``{parameter name: bool mask}`` of the head's output rows ``lo:hi`` (empty without a linear ``head``)."""
    layer = getattr(model, head, None)
    if not isinstance(layer, nn.Linear):
        return {}
    out = {}
    for pname, p in layer.named_parameters():
        w = torch.zeros_like(p, dtype=torch.bool)
        w[lo:hi] = True
        out[f"{head}.{pname}"] = w
    return out
