"""Training FLOPs counted from what each step actually computed.

A :class:`FlopCounter` hooks every linear and conv layer of a model.  While it is ``active``, each
forward call adds ``2 * MACs * weight_density`` (the forward reads only ``W⊙M``), and when that
call's output later receives a gradient it adds

- the input gradient, ``2 * MACs * weight_density``, only if the layer's input needed a gradient
  (the first layer's never does);
- the weight gradient, ``2 * MACs * grad_density`` (the gradient mask ``G``), only if the weight
  requires a gradient.

So extra passes (replay batches, the second pass of SAM, in-batch selection forwards) count as
often as they run, removed examples never reach the counter, and forward passes without a
backward count only their forward.  The dense equivalent adds the same calls at density 1.
Bias, normalisation, activation and loss FLOPs are left out (as in RigL, SparCL and EsaCL).
MACs of a call: ``rows * in_features * out_features`` for a linear layer (``rows`` = all leading
dimensions), ``N * H_out * W_out * out_channels * in_channels/groups * kh * kw`` for a conv.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

import sparsekern

__all__ = ["FlopCounter", "layer_densities", "memory_footprint", "model_capacity"]

PARTS = ("forward", "input_grad", "weight_grad")


def _densities(module: nn.Module) -> tuple[float, float]:
    """(weight density, gradient density) of a layer's masks; plain layers are dense."""
    if isinstance(module, (sparsekern.SparseLinear, sparsekern.SparseConv2d)):
        n = module.weight_mask.numel()
        return float(module.weight_mask.sum()) / n, float(module.grad_mask.sum()) / n
    return 1.0, 1.0


def layer_densities(model: nn.Module) -> dict[str, dict[str, float]]:
    """``{layer name: {"weight": density, "grad": density}}`` for every linear/conv layer."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w, g = _densities(m)
            out[name] = {"weight": w, "grad": g}
    return out


def _macs(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        n, cout, ho, wo = y.shape if y.dim() == 4 else (1, *y.shape)
        k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        return int(n * ho * wo * cout * k)
    rows = x.numel() // module.in_features
    return int(rows * module.in_features * module.out_features)


class FlopCounter:
    """Counts training FLOPs of ``model`` (see the module docstring for the rules).

    Use ``counter.active = True`` around training; evaluation stays uncounted.  ``totals`` and
    ``dense_totals`` map each part (forward, input_grad, weight_grad) to FLOPs; ``total`` and
    ``dense_total`` are their sums; ``per_layer`` keeps the counted FLOPs of each layer.

    Example:
        >>> counter = FlopCounter(model)
        >>> counter.active = True
        >>> loss = F.cross_entropy(model(x), y); loss.backward()
        >>> counter.total, counter.dense_total
    """

    def __init__(self, model: nn.Module) -> None:
        self.active = False
        self.totals: dict[str, float] = dict.fromkeys(PARTS, 0.0)
        self.dense_totals: dict[str, float] = dict.fromkeys(PARTS, 0.0)
        self.per_layer: dict[str, float] = defaultdict(float)
        self.examples = 0  # rows seen by the first counted layer, a proxy for examples processed
        #: calls count ``row_scale`` times their rows: a data-parallel rank running its shard of a
        #: batch counts the whole batch (sparsekern_cl.parallel), so every rank reports one process's FLOPs
        self.row_scale = 1.0
        self._cache: dict[int, tuple[tuple[int, int], tuple[float, float]]] = {}
        self._handles = []
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                self._handles.append(m.register_forward_hook(self._make_hook(name)))

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def total(self) -> float:
        return sum(self.totals.values())

    @property
    def dense_total(self) -> float:
        return sum(self.dense_totals.values())

    def _density(self, module: nn.Module) -> tuple[float, float]:
        # a sparse layer whose last call ran dense (sparsekern.choice) counts dense: what ran
        dec = getattr(module, "last_choice", None)
        if dec is not None and dec.path == "dense":
            return 1.0, 1.0
        wm = getattr(module, "weight_mask", None)
        gm = getattr(module, "grad_mask", None)
        if not isinstance(wm, torch.Tensor) or not isinstance(gm, torch.Tensor):
            return 1.0, 1.0
        # masks change in place (set_mask / set_grad_mask); their version counters say when
        key = (wm._version, gm._version, wm.data_ptr(), gm.data_ptr())
        hit = self._cache.get(id(module))
        if hit is not None and hit[0] == key:
            return hit[1]
        d = _densities(module)
        self._cache[id(module)] = (key, d)
        return d

    def _add(self, name: str, part: str, flops: float, dense: float) -> None:
        self.totals[part] = self.totals.get(part, 0.0) + flops
        self.dense_totals[part] = self.dense_totals.get(part, 0.0) + dense
        self.per_layer[name] += flops

    def add(self, layer: str, part: str, flops: float, dense_flops: float = 0.0) -> None:
        """Count work a method does outside the layers' own calls (only while ``active``).

        Args:
            layer: the layer it belongs to (for ``per_layer``).
            part: a part name; a new one (e.g. ``"dense_grad"``) gets its own entry in ``totals``.
            flops: FLOPs done; ``dense_flops``: what the dense equivalent run does for it (0 for
                work a dense model never needs, such as a dense gradient for growth decisions).
        """
        if self.active:
            self._add(layer, part, float(flops), float(dense_flops))

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            if not self.active or not isinstance(output, torch.Tensor):
                return
            x = inputs[0]
            macs = _macs(module, x, output) * self.row_scale
            wd, gd = self._density(module)
            self._add(name, "forward", 2.0 * macs * wd, 2.0 * macs)
            if not output.requires_grad:
                return
            need_dx = x.requires_grad
            need_dw = module.weight.requires_grad

            def on_grad(grad):
                if need_dx:
                    self._add(name, "input_grad", 2.0 * macs * wd, 2.0 * macs)
                if need_dw:
                    self._add(name, "weight_grad", 2.0 * macs * gd, 2.0 * macs)
                return None

            output.register_hook(on_grad)

        return hook

    def snapshot(self) -> dict:
        """Totals as a plain dict (also what checkpoints store)."""
        return {"totals": dict(self.totals), "dense_totals": dict(self.dense_totals), "per_layer": dict(self.per_layer)}

    def load_snapshot(self, snap: dict) -> None:
        self.totals = dict(snap["totals"])
        self.dense_totals = dict(snap["dense_totals"])
        self.per_layer = defaultdict(float, snap["per_layer"])


def memory_footprint(model: nn.Module, input_shape, batch_rows: int, bytes_per_value: int = 4) -> dict:
    """Training memory footprint as in SparCL's appendix: weights + gradients + activations.

    Weights count the non-zero (in-mask) entries of sparse layers plus every other parameter;
    gradients count the gradient-mask entries plus every other trainable parameter; activations
    are the outputs of every linear/conv layer for ``batch_rows`` examples (all forward graphs of a
    step stay alive until its backward, so replay strategies pass their total rows).  Index
    storage is left out, as in SparCL.  Values in bytes, with the dense model's figures beside them.
    """
    w = g = dense_w = dense_g = 0
    for m in model.modules():
        for pname, p in m.named_parameters(recurse=False):
            n = p.numel()
            dense_w += n
            dense_g += n if p.requires_grad else 0
            if pname == "weight" and isinstance(m, (sparsekern.SparseLinear, sparsekern.SparseConv2d)):
                w += int(m.weight_mask.sum())
                g += int(m.grad_mask.sum()) if p.requires_grad else 0
            else:
                w += n
                g += n if p.requires_grad else 0
    acts = 0
    handles = []

    def count(module, inputs, output):
        nonlocal acts
        acts += output.numel()

    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            handles.append(m.register_forward_hook(count))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p0 = next(model.parameters())
            model(torch.zeros((1, *input_shape), device=p0.device, dtype=p0.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    acts *= batch_rows
    b = bytes_per_value
    return {
        "weights_bytes": w * b,
        "grads_bytes": g * b,
        "activations_bytes": acts * b,
        "total_bytes": (w + g + acts) * b,
        "dense_total_bytes": (dense_w + dense_g + acts) * b,
    }


def model_capacity(sparsity: float, n_masks: int, gamma: float = 0.75) -> float:
    """EsaCL's model capacity: ``(1 - S) + (1 - γ) T / 32``.

    ``S`` is the overall weight sparsity, ``T`` the number of stored task masks (0 for a dense
    model, 1 for one shared mask, one per task for per-task masks) and ``γ`` the compression rate
    of a stored mask (0.75 in EsaCL).
    """
    if not 0 <= sparsity < 1 or math.isnan(sparsity):
        raise ValueError(f"sparsity: expected a value in [0, 1), got {sparsity!r}")
    return (1.0 - sparsity) + (1.0 - gamma) * n_masks / 32.0
