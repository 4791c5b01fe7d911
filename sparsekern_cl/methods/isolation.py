"""Parameter isolation shared by EsaCL and DST: parameters (or some of their entries) that must not move.

A sparse layer's frozen *weights* leave its gradient mask, so the kernels never compute their
gradient.  Everything else a method freezes (biases, normalisation layers, dense layers, the
head's rows of finished tasks) is held by :class:`FrozenEntries`: its gradient is zeroed after
the backward pass, and its values are restored after every optimizer step, so neither momentum
nor weight decay can move it.  :func:`freeze_norm_statistics` keeps BatchNorm running statistics
fixed while training (the layers run in eval mode); :func:`recalibrate_norm_statistics` first
sets them to the exact statistics of a task's data (the running averages of a short task still
carry their initial values: after 25 steps at momentum 0.1, 0.9^25 = 7 % of the initial variance 1).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "FrozenEntries",
    "freeze_norm_statistics",
    "recalibrate_norm_statistics",
    "shared_parameter_names",
    "head_rows",
]


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


@torch.no_grad()
def recalibrate_norm_statistics(model: nn.Module, batches) -> bool:
    """Set every BatchNorm layer's running statistics to those of its inputs over all of ``batches``.

    The batches run through the model in train mode (each normalised by its own statistics, as in
    training); each layer's running mean and (unbiased) variance become the ones of all its inputs
    pooled, so no trace of the running averages' initial values or of earlier weights is left, and
    batches of any sizes weigh by their examples.  Parameters do not change; the model's modes are
    restored.  Returns whether the model has a BatchNorm layer.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    sums = {m: [0.0, 0.0, 0] for m in norms}  # per layer: sum of x, sum of x^2 (per channel), count

    def hook(module, inputs):
        x = inputs[0].detach().transpose(0, 1).reshape(inputs[0].shape[1], -1).double()
        acc = sums[module]
        acc[0] = acc[0] + x.sum(1)
        acc[1] = acc[1] + (x * x).sum(1)
        acc[2] += x.shape[1]

    modes = {m: m.training for m in model.modules()}
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    handles = [m.register_forward_pre_hook(hook) for m in norms]
    try:
        model.train()
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, was in modes.items():
            m.train(was)
    for m, (mean, var, tracked) in zip(norms, saved):
        s1, s2, n = sums[m]
        m.num_batches_tracked.copy_(tracked)
        if n == 0:  # no data reached the layer: leave it as it was
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            continue
        mu = s1 / n
        v = (s2 / n - mu * mu).clamp_min(0.0) * (n / max(n - 1, 1))
        m.running_mean.copy_(mu.to(m.running_mean.dtype))
        m.running_var.copy_(v.to(m.running_var.dtype))
    return True


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
