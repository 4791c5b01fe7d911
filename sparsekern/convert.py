"""Model conversion: ``sparsify_`` swaps ``nn.Linear`` / ``nn.Conv2d`` for the sparse modules in place."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .formats import LAYOUTS, normalize_block_size
from .masks import check_sparsity, erk_densities, global_magnitude_masks, magnitude_mask, random_mask
from .nn import SparseConv2d, SparseLinear

__all__ = ["SparsityConfig", "sparsify_", "densify_", "dense_state_dict", "sparse_modules", "skip_first_and_last"]

DISTRIBUTIONS = ("uniform", "erk")
METHODS = ("magnitude", "global_magnitude", "random")


@dataclass
class SparsityConfig:
    """How ``sparsify_`` builds masks.

    Attributes:
        sparsity: target fraction of zero weights over the converted layers, in ``[0, 1)``.
        distribution: ``"uniform"`` (every layer at ``sparsity``) or ``"erk"`` (Erdős–Rényi–Kernel).
        method: ``"magnitude"`` (per layer), ``"global_magnitude"`` (one threshold over all
            converted layers; ignores ``distribution``) or ``"random"``.
        layout: ``"unstructured"`` or ``"block"``; block_size: ``b`` or ``(bo, bk)`` channels.
        backend: backend forced on every converted layer (``None``: automatic).
        seed: seed of the ``"random"`` method.
        keep_dense: fully-qualified module names to leave dense (e.g. ``("conv1", "fc")``).
    """

    sparsity: float = 0.9
    distribution: str = "uniform"
    method: str = "magnitude"
    layout: str = "unstructured"
    block_size: int | tuple[int, int] | None = None
    backend: str | None = None
    seed: int = 0
    keep_dense: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.sparsity = check_sparsity(self.sparsity)
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution: expected one of {DISTRIBUTIONS}, got {self.distribution!r}")
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {self.layout!r}")
        if self.layout == "block":
            if self.block_size is None:
                raise ValueError("block_size: required when layout='block'")
            self.block_size = normalize_block_size(self.block_size)
        self.keep_dense = tuple(self.keep_dense)


def skip_first_and_last(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    """A ``filter_fn`` that leaves the first conv/linear layer and the last one dense."""
    names = [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    skip = {names[0], names[-1]} if names else set()
    return lambda module, fqn: fqn not in skip


def _default_filter(module: nn.Module, fqn: str) -> bool:
    return True


def sparsify_(
    model: nn.Module,
    config: SparsityConfig | float,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Replace ``nn.Linear`` / ``nn.Conv2d`` layers of ``model`` with sparse ones, in place.

    Args:
        model: any module; converted in place and returned.
        config: a :class:`SparsityConfig`, or a float sparsity (uniform, magnitude, unstructured).
        filter_fn: ``filter_fn(module, fqn) -> bool``; only layers for which it returns True are
            converted (and not named in ``config.keep_dense``).  Subclasses of ``nn.Linear`` /
            ``nn.Conv2d`` that keep the parent's forward are converted too; one that cannot be
            (an attention block's ``out_proj``, an overridden forward, a lazy module) stays dense
            with a warning that says why.

    Returns:
        ``model``.  Pruned masks from ``torch.nn.utils.prune`` are taken over as they are.  Each
        sparse layer takes the dense layer's weight and bias Parameters themselves (no copy:
        an optimizer built before the call keeps stepping them), with the pruned weights zeroed.

    Example:
        >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> sparsify_(model, SparsityConfig(0.9), filter_fn=skip_first_and_last(model))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(config, (int, float)) and not isinstance(config, bool):
        config = SparsityConfig(sparsity=config)
    if not isinstance(config, SparsityConfig):
        raise TypeError(f"config: expected a SparsityConfig or a float sparsity, got {type(config).__name__}")
    filt = filter_fn or _default_filter
    known = {n for n, _ in model.named_modules()}
    for name in config.keep_dense:
        if name not in known:
            raise ValueError(f"config.keep_dense: no module named {name!r} in the model")

    targets = [
        (fqn, m)
        for fqn, m in model.named_modules()
        if fqn not in config.keep_dense and _convertible(model, fqn, m) and filt(m, fqn)
    ]
    if not targets:
        return model
    weights = [getattr(m, "weight_orig", m.weight) for _, m in targets]
    masks: list[torch.Tensor | None]
    pruned = [getattr(m, "weight_mask", None) for _, m in targets]
    if config.method == "global_magnitude":
        masks = global_magnitude_masks(weights, config.sparsity, layout=config.layout, block_size=config.block_size)
    else:
        shapes = [tuple(w.shape) for w in weights]
        if config.distribution == "erk":
            densities = erk_densities(shapes, config.sparsity)
        else:
            densities = [1.0 - config.sparsity] * len(shapes)
        gen = torch.Generator().manual_seed(config.seed)
        masks = []
        for w, d in zip(weights, densities):
            s = min(max(1.0 - d, 0.0), 1.0 - 1e-12)
            if config.method == "random":
                m = random_mask(w.shape, s, layout=config.layout, block_size=config.block_size, generator=gen)
            else:
                m = magnitude_mask(w, s, layout=config.layout, block_size=config.block_size)
            masks.append(m.to(w.device))
    for (fqn, module), mask, pmask in zip(targets, masks, pruned):
        if isinstance(pmask, torch.Tensor):  # a prune mask wins over the config
            mask = pmask
        cls = SparseLinear if isinstance(module, nn.Linear) else SparseConv2d
        kwargs = {"layout": config.layout, "block_size": config.block_size, "backend": config.backend}
        new = cls.from_dense(module, mask=mask, share=True, **kwargs)
        _set_submodule(model, fqn, new)
    return model


def _not_convertible(model: nn.Module, fqn: str, module: nn.Module) -> str | None:
    """Why a subclass of ``nn.Linear`` / ``nn.Conv2d`` cannot become a sparse layer (``None``: it can)."""
    base = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
    parent = model.get_submodule(fqn.rpartition(".")[0]) if fqn else None
    if isinstance(parent, nn.MultiheadAttention):
        return (
            "nn.MultiheadAttention reads its out_proj's weight directly (F.multi_head_attention_forward) and never "
            "calls out_proj's forward, so a mask would be ignored"
        )
    if isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return "a lazy module has no weight yet; run one forward first"
    overridden = [
        f for f in ("forward", "_conv_forward") if getattr(type(module), f, None) is not getattr(base, f, None)
    ]
    if overridden:
        return f"{type(module).__name__} overrides {overridden[0]}(), which the sparse layer would drop"
    return None


def _convertible(model: nn.Module, fqn: str, module: nn.Module) -> bool:
    """Whether ``sparsify_`` swaps ``module``: ``nn.Linear`` / ``nn.Conv2d`` and their subclasses
    that keep the parent's forward (e.g. ``NonDynamicallyQuantizableLinear``); a subclass it
    cannot swap is left dense with a warning that says why."""
    if isinstance(module, (SparseLinear, SparseConv2d)) or not isinstance(module, (nn.Linear, nn.Conv2d)):
        return False
    if type(module) in (nn.Linear, nn.Conv2d):
        return True
    why = _not_convertible(model, fqn, module)
    if why is not None:
        warnings.warn(f"sparsify_: leaving {fqn or 'the model'} ({type(module).__name__}) dense: {why}", stacklevel=3)
    return why is None


def _set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    if fqn == "":
        raise ValueError("model: sparsify_ cannot replace the root module itself; wrap it in a container")
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def sparse_modules(model: nn.Module) -> list[tuple[str, SparseLinear | SparseConv2d]]:
    """``(fqn, module)`` of every sparse layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))]


def densify_(model: nn.Module) -> nn.Module:
    """Replace every sparse layer with its ``to_dense()`` equivalent, in place."""
    for fqn, m in sparse_modules(model):
        _set_submodule(model, fqn, m.to_dense())
    return model


def dense_state_dict(state_dict: dict) -> dict:
    """A copy of a sparse model's ``state_dict`` loadable (strictly) into the dense model.

    Every ``<prefix>weight`` with a ``<prefix>weight_mask`` is multiplied by its mask, and the
    mask buffers are dropped.
    """
    out = {}
    for k, v in state_dict.items():
        if k.endswith("weight_mask") or k.endswith("grad_mask"):
            continue
        mk = k[: -len("weight")] + "weight_mask" if k.endswith("weight") else None
        if mk is not None and mk in state_dict:
            v = v.masked_fill(~state_dict[mk].bool(), 0)
        out[k] = v
    return out
