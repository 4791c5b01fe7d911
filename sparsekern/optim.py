"""Sparse-aware optimizers: a step that touches only the trainable entries of sparse layers.

A :class:`~sparsekern.SparseLinear` / :class:`~sparsekern.SparseConv2d` keeps a dense ``weight``
whose gradient is exactly zero outside the gradient mask ``G`` (``grad_mask``).  A stock
``torch.optim`` step still reads and writes every entry, and keeps a dense state (momentum,
Adam moments) that stays zero outside ``G``.  The optimizers here (:class:`SGD`, :class:`Adam`,
:class:`AdamW`) are drop-in subclasses of their ``torch.optim`` namesakes that, for the weight of
every sparse layer of ``model``, update only the entries of ``G`` and keep the state compactly on
``G``; every other parameter (biases, norm layers, dense layers) takes torch's own update.

Example:
    >>> model = sparsekern.sparsify_(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), 0.9)
    >>> opt = sparsekern.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, model=model)

``model`` (keyword, required) is the module whose sparse layers the optimizer should know: a
parameter that is the ``weight`` of one of its ``SparseLinear`` / ``SparseConv2d`` layers is a
*sparse parameter*, any other parameter a *dense* one.  Parameters, groups and hyper-parameters are
as in ``torch.optim``; ``fused``, ``capturable`` and ``differentiable`` are not offered.

Semantics
---------
* **Same results as torch.optim.**  The update of an entry of ``G`` is the one of torch.optim's
  single-tensor implementation, operation by operation with the same roundings, so with fixed
  masks the weights are bit-identical to those of the stock optimizer on the same model (SGD with
  or without momentum / nesterov / dampening, Adam, AdamW, amsgrad; float32 and float64; tested
  with ``torch.equal``).  Outside ``G`` the stock optimizer does not move a weight either when
  ``weight_decay == 0``: its gradient is zero and so is its state.
* **Weight decay.**  With ``weight_decay > 0`` the stock optimizer also decays the entries outside
  ``G``: frozen weights (in ``weight_mask`` but not in ``grad_mask``) drift towards zero.  Here they
  do not: a frozen weight stays frozen and a pruned weight does not exist.  The entries of ``G``
  are still bit-identical.
* **State.**  The state of a sparse parameter is one value per entry of ``G`` (``[nnz(G)]``, in the
  order of ``state["index"]``: the row-major flat positions of ``G``, int32 where they fit), so it
  costs ``nnz(G)``, not ``numel``; Adam's ``step`` stays one count per parameter.
* **Mask changes.**  When ``G`` changes (``set_mask`` / ``set_grad_mask``, e.g. SparCL, DST,
  EsaCL) the state is remapped at the next step: entries that stay in ``G`` keep their state,
  entries new to ``G`` start at zero (the optimizer-state reset of a regrown weight; Adam's bias
  correction continues from the parameter's step count, as in torch.optim for an entry whose
  gradient was zero until then), entries that leave ``G`` lose theirs and stop moving.  (The stock
  optimizer keeps moving a weight that left ``G`` by its remaining momentum.)
* **Compact gradients.**  With ``grad_layout="compact"`` the sparse layers' backward writes only
  the ``nnz(G)`` values of ``dW`` (:attr:`~sparsekern.SparseLinear.grad_values`) and no dense
  ``weight.grad``: no dense gradient to allocate, write, zero or read.  ``step`` reads them and
  then drops them (``zero_grad`` would), so a loop that calls ``model.zero_grad()`` instead of the
  optimizer's still starts each step from zero.  The weights are bit-identical to those of the
  dense layout.  Code that reads ``weight.grad`` (clipping, hooks, a stock optimizer) needs the
  dense layout, or :meth:`~sparsekern.SparseLinear.weight_grad`.
* **state_dict.**  ``state_dict()`` holds the compact values and ``index``; ``load_state_dict``
  restores them, so a resumed run continues bit-identically, and remaps them if the loaded model's
  ``G`` differs.  A stock optimizer's dense state for a sparse parameter is compacted onto ``G`` at
  the next step.

The update runs in the fused C++ ops ``torch.ops.sparsekern.sgd_step_masked_`` /
``adam_step_masked_`` (``csrc/cpu/optim.cpp``) for contiguous float32 / float64 CPU weights, and
otherwise -- other devices, the extension not built, or ``SPARSEKERN_BACKEND=reference`` (the kill
switch) -- in PyTorch: torch.optim's functional update on the gathered entries of ``G``.  The C++
Adam step takes its square roots from torch's own ``sqrt`` (MKL's in the x86 wheels, which is not
correctly rounded: ``std::sqrt`` differs by one ulp on about 1 % of the entries), so Adam is
bit-identical too.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn
from torch.optim.adam import adam as _adam  # torch's functional updates, for bit-identical dense steps
from torch.optim.sgd import sgd as _sgd

from ._backends import ENV_VAR
from .convert import sparse_modules

__all__ = ["SGD", "Adam", "AdamW", "kernels_available"]

_KERNEL_OPS = ("sgd_step_masked_", "adam_step_masked_")
_STATE: dict = {}
_KERNEL_DTYPES = (torch.float32, torch.float64)
# The keys of the compact per-entry state (torch.optim's names).
_COMPACT_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def kernels_available() -> tuple[bool, str]:
    """``(ok, reason)``: whether the fused C++ optimizer ops are built and loaded."""
    if "ok" not in _STATE:
        from .kernels.cpu import load_library

        ok, why = load_library()
        if ok and not all(hasattr(torch.ops.sparsekern, n) for n in _KERNEL_OPS):
            ok, why = False, "sparsekern._C lacks the optimizer ops (built before csrc/cpu/optim.cpp); rebuild it"
        if ok:
            _register_fakes()
        _STATE["ok"], _STATE["why"] = ok, why
    return _STATE["ok"], _STATE["why"]


def _register_fakes() -> None:
    # In-place ops returning nothing: the fake only has to exist (torch.compile, opcheck).
    @torch.library.register_fake("sparsekern::sgd_step_masked_")
    def _(weight, grad, idx, momentum_buffer, lr, momentum, dampening, weight_decay, nesterov, maximize, first):
        return None

    @torch.library.register_fake("sparsekern::adam_step_masked_")
    def _(
        weight,
        grad,
        idx,
        exp_avg,
        exp_avg_sq,
        max_exp_avg_sq,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        step,
        decoupled_weight_decay,
        maximize,
    ):
        return None


def _written(p: torch.Tensor) -> None:
    """Bump ``p``'s version after a fused step wrote it through its data pointer, as torch's own
    in-place updates do (autograd's saved-tensor check and the version-keyed caches read it)."""
    torch.autograd.graph.increment_version(p)


def _use_kernel(p: torch.Tensor, grad: torch.Tensor) -> bool:
    return (
        p.device.type == "cpu"
        and p.dtype in _KERNEL_DTYPES
        and grad.dtype == p.dtype
        and p.is_contiguous()
        and grad.is_contiguous()
        and os.environ.get(ENV_VAR, "").strip().lower() != "reference"
        and kernels_available()[0]
    )


def _scalar_dtype() -> torch.dtype:
    # the dtype torch.optim gives Adam's `step`
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- argument checks
def _number(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a number or a 1-element tensor, got shape {tuple(value.shape)}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if math.isnan(value):
        raise ValueError(f"{name}: expected a number, got nan")
    return float(value)


def _non_negative(name: str, value) -> None:
    if not _number(name, value) >= 0:
        raise ValueError(f"{name}: expected a value >= 0, got {value}")


def _check_model(model) -> dict:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model: expected the nn.Module whose sparse layers this optimizer updates, got {type(model).__name__}"
        )
    return {m.weight: m for _, m in sparse_modules(model)}


# ----------------------------------------------------------------------------- compact state
def _same_index(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.numel() == b.numel() and a.device == b.device and torch.equal(a.to(b.dtype), b)


def _remap(values: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Values on ``old`` positions moved to ``new`` positions (both sorted); zero where new."""
    out = values.new_zeros(new.numel())
    if old.numel() and new.numel():
        old, new = old.to(values.device, torch.int64), new.to(torch.int64)
        pos = torch.searchsorted(old, new).clamp_(max=old.numel() - 1)
        hit = old[pos] == new
        out[hit] = values[pos[hit]]
    return out


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).index_select(0, idx)


def _gathered(grad: torch.Tensor, p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``grad`` on ``idx``: gathered from a dense gradient, as it is if already compact."""
    return grad if grad.shape != p.shape else _gather(grad, idx)


def _scatter_(p: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    if p.is_contiguous():
        p.view(-1).index_put_((idx,), values)
    else:
        flat = p.reshape(-1).clone()
        flat.index_put_((idx,), values)
        p.copy_(flat.view_as(p))


class _SparseStep:
    """The parts :class:`SGD` and :class:`Adam` share: which parameters are sparse, the index of
    each one's ``G`` (cached per mask version), the compact state and its ``state_dict``.
    Subclasses define ``_dense_step(group, params)`` and ``_sparse_step(group, param)``."""

    param_groups: list
    state: dict

    def _init_sparse(self, model, grad_layout: str | None = None) -> None:
        self._layers = _check_model(model)
        self._index_cache: dict = {}
        if grad_layout is not None:
            self._set_grad_layout(grad_layout)

    def _split(self, group) -> tuple[list, list]:
        """(dense params, sparse params with a gradient, dense or compact) of a group."""
        dense, sparse = [], []
        for p in group["params"]:
            if p in self._layers:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("sparsekern.optim does not take torch.sparse gradients")
                if p.grad is not None or self._layers[p].grad_values is not None:
                    sparse.append(p)
            else:
                dense.append(p)
        return dense, sparse

    def _grad_on(self, p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The gradient of sparse parameter ``p``: dense ``p.grad`` or, for a layer in the compact
        layout, its ``grad_values`` on ``idx`` (moved there if ``G`` changed since the backward;
        a dense gradient beside them is added)."""
        layer = self._layers[p]
        vals = layer.grad_values
        if vals is None:
            return p.grad
        src = layer.grad_index
        if src is not idx and not _same_index(src, idx):
            vals = _remap(vals, src, idx)
        if p.grad is not None:
            vals = vals + _gather(p.grad, idx.to(p.grad.device).long())
        return vals.to(p.dtype)

    def _consume(self, p: torch.Tensor) -> None:
        self._layers[p].zero_grad_values()

    def _set_grad_layout(self, grad_layout: str) -> None:
        if grad_layout not in ("dense", "compact"):
            raise ValueError(f"grad_layout: expected 'dense' or 'compact', got {grad_layout!r}")
        for layer in self._layers.values():
            layer.set_grad_layout(grad_layout)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; also drops the compact gradients of the layers."""
        super().zero_grad(set_to_none)  # type: ignore[misc]
        for layer in self._layers.values():
            layer.zero_grad_values()

    def _grad_index(self, p: torch.Tensor) -> torch.Tensor:
        """Flat row-major positions of ``G`` (the layer's own, cached with its masks), kept here
        per mask version so a step does not look the patterns up again."""
        layer = self._layers[p]
        g, m = layer.grad_mask, layer.weight_mask
        hit = self._index_cache.get(p)
        if hit is not None and hit[0] is g and hit[1] == (g._version, m._version):
            return hit[2]
        idx = layer._flat_grad_index()
        self._index_cache[p] = (g, (g._version, m._version), idx)
        return idx

    def _compact_state(self, p: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``(index, state)`` of a sparse parameter, the state moved onto the current ``G``."""
        idx = self._grad_index(p)
        state = self.state[p]
        old = state.get("index")
        if old is None:
            for key in _COMPACT_KEYS:  # a dense state (e.g. from a torch.optim state_dict)
                if isinstance(state.get(key), torch.Tensor) and state[key].shape == p.shape:
                    state[key] = _gather(state[key], idx.to(state[key].device))
        elif old is not idx and not _same_index(old, idx):
            for key in _COMPACT_KEYS:
                if isinstance(state.get(key), torch.Tensor):
                    state[key] = _remap(state[key], old, idx)
        state["index"] = idx
        return idx, state

    def __getstate__(self):
        # torch.optim keeps only defaults, state and groups; a copy or pickle must know the layers too
        out = super().__getstate__()  # type: ignore[misc]
        out["_layers"], out["_index_cache"] = self._layers, {}
        return out

    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step (``closure``: re-evaluates the model and returns the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            dense, sparse = self._split(group)
            self._dense_step(group, dense)  # torch's own update
            for p in sparse:
                self._sparse_step(group, p)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``; the int ``index`` of each compact state is
        kept as it is (torch would cast it to the parameter's floating dtype)."""
        saved = state_dict.get("state", {})
        indices = {k: s["index"] for k, s in saved.items() if isinstance(s, dict) and "index" in s}
        stripped = dict(state_dict)
        stripped["state"] = {
            k: ({n: v for n, v in s.items() if n != "index"} if k in indices else s) for k, s in saved.items()
        }
        super().load_state_dict(stripped)  # type: ignore[misc]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(saved_ids, params))
        for k, ix in indices.items():
            p = by_id[k]
            self.state[p]["index"] = ix.to(p.device)


# ----------------------------------------------------------------------------- SGD
class SGD(_SparseStep, torch.optim.SGD):
    """``torch.optim.SGD`` that updates only ``G`` of the sparse layers of ``model``.

    Args:
        params: parameters or parameter groups, as ``torch.optim.SGD``.
        lr, momentum, dampening, weight_decay, nesterov, maximize, foreach: as ``torch.optim.SGD``.
        model: the module whose ``SparseLinear`` / ``SparseConv2d`` weights are sparse parameters.
        grad_layout: ``"compact"`` / ``"dense"`` sets every sparse layer of ``model`` to that
            gradient layout (:meth:`~sparsekern.SparseLinear.set_grad_layout`); ``None`` leaves them.

    Raises:
        TypeError / ValueError: a bad argument (the message names it).

    See :mod:`sparsekern.optim` for the semantics (bit-identical to ``torch.optim.SGD`` with fixed
    masks and ``weight_decay=0``; no decay outside ``G``; compact momentum, remapped when ``G``
    changes).

    Example:
        >>> opt = sparsekern.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, model=model)
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        model: nn.Module,
        grad_layout: str | None = None,
    ) -> None:
        _non_negative("lr", lr)
        _non_negative("momentum", momentum)
        _number("dampening", dampening)
        _non_negative("weight_decay", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                f"nesterov: requires momentum > 0 and dampening = 0, got momentum={momentum}, dampening={dampening}"
            )
        self._init_sparse(model, grad_layout)
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize, foreach=foreach)

    def _dense_step(self, group, dense) -> None:
        params, grads, bufs = [], [], []
        has_sparse_grad = self._init_group({**group, "params": dense}, params, grads, bufs)
        if not params:
            return
        _sgd(
            params,
            grads,
            bufs,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            has_sparse_grad=has_sparse_grad,
            foreach=group["foreach"],
            fused=group["fused"],
        )
        if group["momentum"] != 0:
            for p, buf in zip(params, bufs):
                self.state[p]["momentum_buffer"] = buf

    def _sparse_step(self, group, p) -> None:
        momentum = group["momentum"]
        if momentum == 0:
            idx, buf, first = self._grad_index(p), None, False
        else:
            idx, state = self._compact_state(p)
            buf = state.get("momentum_buffer")
            first = buf is None
        lr = float(group["lr"])
        grad = self._grad_on(p, idx)
        if _use_kernel(p, grad):
            if first:
                buf = p.new_empty(idx.numel())
            torch.ops.sparsekern.sgd_step_masked_(
                p,
                grad,
                idx,
                buf,
                lr,
                momentum,
                group["dampening"],
                group["weight_decay"],
                group["nesterov"],
                group["maximize"],
                first,
            )
            _written(p)
        else:
            values = _gather(p, idx)
            bufs = [buf] if momentum != 0 else []
            _sgd(
                [values],
                [_gathered(grad, p, idx)],
                bufs,
                weight_decay=group["weight_decay"],
                momentum=momentum,
                lr=lr,
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
                foreach=group["foreach"],
            )
            _scatter_(p, idx, values)
            buf = bufs[0] if bufs else None
        if momentum != 0:
            state["momentum_buffer"] = buf
        self._consume(p)


# ----------------------------------------------------------------------------- Adam / AdamW
class Adam(_SparseStep, torch.optim.Adam):
    """``torch.optim.Adam`` that updates only ``G`` of the sparse layers of ``model``.

    Args:
        params: parameters or parameter groups, as ``torch.optim.Adam``.
        lr, betas, eps, weight_decay, amsgrad, maximize, foreach, decoupled_weight_decay: as
            ``torch.optim.Adam`` (``betas``: two floats).
        model: the module whose ``SparseLinear`` / ``SparseConv2d`` weights are sparse parameters.
        grad_layout: as :class:`SGD`.

    Raises:
        TypeError / ValueError: a bad argument (the message names it).

    See :mod:`sparsekern.optim` for the semantics (bit-identical to ``torch.optim.Adam`` with fixed
    masks and ``weight_decay=0``; no decay outside ``G``; compact moments, remapped when ``G``
    changes, one ``step`` per parameter).

    Example:
        >>> opt = sparsekern.optim.Adam(model.parameters(), lr=1e-3, model=model)
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        decoupled_weight_decay: bool = False,
        model: nn.Module,
        grad_layout: str | None = None,
    ) -> None:
        _non_negative("lr", lr)
        _non_negative("eps", eps)
        _non_negative("weight_decay", weight_decay)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas: expected two floats in [0, 1), got {betas!r}")
        for i, b in enumerate(betas):
            if isinstance(b, torch.Tensor) or not 0 <= _number(f"betas[{i}]", b) < 1:
                raise ValueError(f"betas[{i}]: expected a float in [0, 1), got {b!r}")
        self._init_sparse(model, grad_layout)
        super().__init__(
            params,
            lr,
            (float(betas[0]), float(betas[1])),
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            foreach=foreach,
            decoupled_weight_decay=decoupled_weight_decay,
        )

    def _hyper(self, group) -> dict:
        beta1, beta2 = group["betas"]
        return {
            "amsgrad": group["amsgrad"],
            "beta1": beta1,
            "beta2": beta2,
            "lr": group["lr"],
            "weight_decay": group["weight_decay"],
            "eps": group["eps"],
            "maximize": group["maximize"],
            "decoupled_weight_decay": group["decoupled_weight_decay"],
            "foreach": group["foreach"],
        }

    def _dense_step(self, group, dense) -> None:
        lists: tuple[list, ...] = ([], [], [], [], [], [])
        has_complex = self._init_group({**group, "params": dense}, *lists)
        if lists[0]:
            _adam(*lists, has_complex=has_complex, fused=group["fused"], **self._hyper(group))

    def _sparse_step(self, group, p) -> None:
        idx, state = self._compact_state(p)
        n = idx.numel()
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
            if key not in state:
                state[key] = p.new_zeros(n)
        vmax = state.get("max_exp_avg_sq") if group["amsgrad"] else None
        grad = self._grad_on(p, idx)
        self._consume(p)
        if _use_kernel(p, grad):
            state["step"] += 1
            beta1, beta2 = group["betas"]
            torch.ops.sparsekern.adam_step_masked_(
                p,
                grad,
                idx,
                state["exp_avg"],
                state["exp_avg_sq"],
                vmax,
                float(group["lr"]),
                beta1,
                beta2,
                group["eps"],
                group["weight_decay"],
                state["step"].item(),
                group["decoupled_weight_decay"],
                group["maximize"],
            )
            _written(p)
            return
        values = _gather(p, idx)
        _adam(
            [values],
            [_gathered(grad, p, idx)],
            [state["exp_avg"]],
            [state["exp_avg_sq"]],
            [vmax] if vmax is not None else [],
            [state["step"]],
            **self._hyper(group),
        )
        _scatter_(p, idx, values)


class AdamW(Adam):
    """``torch.optim.AdamW`` (Adam with decoupled weight decay, default ``weight_decay=1e-2``) that
    updates only ``G`` of the sparse layers of ``model``; arguments as :class:`Adam`.

    Example:
        >>> opt = sparsekern.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, model=model)
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        model: nn.Module,
        grad_layout: str | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            foreach=foreach,
            decoupled_weight_decay=True,
            model=model,
            grad_layout=grad_layout,
        )

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
