"""State and mask handling shared by ``SparseLinear`` and ``SparseConv2d``."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..formats import (
    LAYOUTS,
    _native,
    as_matrix,
    checked_block_grid,
    invalidate,
    normalize_block_size,
    pattern_block,
    seed_pattern,
)
from ..masks import check_sparsity, magnitude_mask


def _zero_one(mask: torch.Tensor, name: str) -> torch.Tensor:
    """A boolean mask from a boolean or 0/1 tensor (e.g. ``torch.nn.utils.prune``'s float masks);
    any other value raises, so a score tensor never silently becomes a dense mask."""
    if mask.dtype == torch.bool:
        return mask
    if not (mask.is_floating_point() or mask.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"{name}: expected a boolean (or 0/1) tensor, got {mask.dtype}")
    ones = mask == 1
    if not bool((ones | (mask == 0)).all()):
        bad = mask[~(ones | (mask == 0))].flatten()[0].item()
        raise ValueError(
            f"{name}: expected a boolean or 0/1 tensor, got a {mask.dtype} tensor holding {bad!r} "
            f"(threshold scores first, e.g. `scores > t`)"
        )
    return ones


def _as_bool_mask(mask, weight: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"{name}: expected the weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
    return _zero_one(mask, name).detach().to(weight.device)


#: where a sparse layer's backward puts the weight gradient (:meth:`SparseMixin.set_grad_layout`)
GRAD_LAYOUTS = ("dense", "compact")


class _GradSink:
    """A compact-gradient leaf: ``nnz(G)`` entries that take no memory (stride 0), whose ``.grad``
    autograd fills; ``index``: the flat positions of ``G`` it was made for; ``key``: the masks'
    identity and versions, device and dtype."""

    __slots__ = ("key", "index", "leaf")

    def __init__(self, key: tuple, index: torch.Tensor, weight: torch.Tensor) -> None:
        self.key, self.index = key, index
        self.leaf = torch.empty_strided((index.numel(),), (0,), dtype=weight.dtype, device=weight.device)
        self.leaf.requires_grad_(True)

    def __deepcopy__(self, memo):  # a copied or pickled layer starts without a gradient, as after zero_grad
        return None

    def __reduce__(self):
        return (_no_sink, ())


def _no_sink() -> None:
    return None


class SparseMixin:
    """Adds ``weight_mask`` / ``grad_mask`` buffers and the mask API to a Linear/Conv2d subclass.

    Write masks with ``set_mask`` / ``set_grad_mask`` or ``load_state_dict``: these always
    invalidate the cached index metadata.  In-place torch ops on the buffers bump their version
    counter and are seen too; writes behind the counter (``.data``, a NumPy view, DDP's buffer
    broadcast) are seen only under ``SPARSEKERN_CHECK_MASKS=1`` -- otherwise call
    :func:`sparsekern.formats.invalidate` on the buffer after them (see :mod:`sparsekern.formats`).
    A mask written between a forward and its backward makes that backward raise.
    """

    weight: nn.Parameter
    weight_mask: torch.Tensor
    grad_mask: torch.Tensor

    def _init_sparse(self, sparsity, layout, block_size, backend, mask) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
        if layout == "block" and block_size is None:
            raise ValueError("block_size: required when layout='block'")
        self.layout = layout
        self.block_size = normalize_block_size(block_size) if layout == "block" else None
        if backend is not None:
            from .._backends import AUTO, BACKEND_NAMES

            if backend not in (*BACKEND_NAMES, AUTO):
                raise ValueError(f"backend: expected one of {BACKEND_NAMES}, {AUTO!r} or None, got {backend!r}")
            if backend == AUTO:
                backend = None
        self.backend = backend
        #: the :class:`sparsekern.choice.Decision` of the last automatic call (None: pinned or not run)
        self.last_choice = None
        sparsity = check_sparsity(sparsity)
        ones = torch.ones_like(self.weight, dtype=torch.bool)
        self.register_buffer("weight_mask", ones)
        self.register_buffer("grad_mask", ones.clone())
        if mask is not None:
            self.set_mask(mask)
        elif sparsity > 0:
            self.set_mask(magnitude_mask(self.weight, sparsity, layout=layout, block_size=self.block_size))

    # ------------------------------------------------------------------ masks
    @torch.no_grad()
    def set_mask(self, mask, grad_mask=None, *, zero_pruned: bool = True) -> None:
        """Replace the weight mask ``M`` (in place, so metadata caches see the change).

        Args:
            mask: boolean (or 0/1) tensor of the weight's shape.
            grad_mask: the new gradient mask; if ``None``, connections kept from the old mask keep
                their gradient status (frozen stay frozen), new ones are trainable, removed ones
                leave ``G``.
            zero_pruned: set weights outside the new mask to zero, so regrown connections start
                at zero and ``to_dense`` and the stored weight agree.
        """
        new = _as_bool_mask(mask, self._stored_weight(), "mask")
        grid = None
        if self.layout == "block":  # raises if not constant on the tiles
            grid = checked_block_grid(as_matrix(new), *pattern_block(new, "block", self.block_size))
        g = None if grad_mask is None else _as_bool_mask(grad_mask, self._stored_weight(), "grad_mask")
        equal = self._write_masks(
            new, g, zero_pruned, "grad_mask: must be a subset of mask (a gradient only exists where a weight does)"
        )
        self._seed_patterns(grid, equal)

    @torch.no_grad()
    def set_grad_mask(self, mask) -> None:
        """Replace the gradient mask ``G``; it must be a subset of ``weight_mask``."""
        g = _as_bool_mask(mask, self._stored_weight(), "mask")
        equal = self._write_masks(None, g, False, "mask: the gradient mask must be a subset of weight_mask")
        self._seed_patterns(None, equal)

    def _write_masks(self, new, g, zero_pruned: bool, not_subset: str) -> bool | None:
        """``M := new`` (``None``: keep ``M``), ``G := g`` or, without ``g``, ``new & (G | ~M)``
        (kept connections keep their status, new ones are trainable, removed ones leave ``G``);
        weights outside ``new`` zeroed if ``zero_pruned``.  Raises ``ValueError(not_subset)``
        before writing anything if ``g`` is not a subset of the new ``M``.  Returns whether
        ``G == M`` afterwards when that came for free (the C++ pass), else ``None``."""
        w, M, G = self._stored_weight(), self.weight_mask, self.grad_mask
        for t in (G,) if new is None else (M, G):
            invalidate(t)
        keep = M if new is None else new
        ops = _native(keep)
        ts = [t for t in (keep, M, G, g, w if zero_pruned else None) if t is not None]
        if (
            ops is not None
            and all(t.device.type == "cpu" and t.is_contiguous() for t in ts)
            and (not zero_pruned or w.element_size() in (2, 4, 8))
        ):
            code = ops.update_masks_(w, M, G, keep, g, zero_pruned)
            if code == 0:
                raise ValueError(not_subset)
            # the op writes through data pointers: bump the versions that the metadata caches and
            # autograd's in-place checks read, as copy_ / masked_fill_ do
            written = [G] if new is None else [M, G]
            torch.autograd.graph.increment_version(written + [w] if zero_pruned else written)
            return code == 2
        if g is None:
            g = torch.logical_not(M).logical_or_(G).logical_and_(keep)  # new & (G | ~M), one temporary
        elif bool((g & ~keep).any()):
            raise ValueError(not_subset)
        if new is not None:
            M.copy_(new)
        G.copy_(g)
        if zero_pruned:
            w.masked_fill_(~new, 0)
        return None

    def _invalidate_masks(self) -> None:
        invalidate(self.weight_mask)
        invalidate(self.grad_mask)

    def _seed_patterns(self, grid, equal: bool | None) -> None:
        """Cache the patterns the next forward asks for from what the mask update already knows
        (the tile grid of the checked block mask, whether ``G == M``), so it does not recompute them."""
        from ..ops._common import seed_grad_pattern, weight_pattern

        if grid is not None:  # a block mask just written from the one checked: no second check
            pat = seed_pattern(self.weight_mask, self.layout, self.block_size, grid)
        elif equal is None:
            return
        else:
            pat = weight_pattern(self.weight_mask, self.layout, self.block_size)
        if equal is not None:
            seed_grad_pattern(pat, self.grad_mask, equal)

    def _stored_weight(self) -> torch.Tensor:
        """The weight parameter: ``weight_orig`` while ``torch.nn.utils.prune`` reparametrises it."""
        orig = self._parameters.get("weight_orig")
        return self.weight if orig is None else orig

    # ---------------------------------------------------------- torch.nn.utils.prune
    # prune registers a float ``weight_mask`` (a new buffer) and its ``remove`` deletes it; the layer
    # keeps its own boolean buffer instead, written in place, so every metadata cache sees the change.
    def register_buffer(self, name: str, tensor, persistent: bool = True) -> None:
        if (
            name == "weight_mask"
            and isinstance(tensor, torch.Tensor)
            and isinstance(self._buffers.get(name), torch.Tensor)
        ):
            if tensor is not self._buffers[name]:
                self._take_prune_mask(tensor)
            return
        super().register_buffer(name, tensor, persistent)  # type: ignore[misc]

    @torch.no_grad()
    def _take_prune_mask(self, mask: torch.Tensor) -> None:
        """``M := M & (mask != 0)``: pruning removes connections (``set_mask`` regrows them); the
        stored weight keeps its values (prune's ``weight = weight_orig * weight_mask``)."""
        new = _as_bool_mask(mask, self.weight_mask, "weight_mask").logical_and(self.weight_mask)
        self.set_mask(new, zero_pruned=False)

    def __delattr__(self, name: str) -> None:
        # prune.remove deletes the computed `weight`, then the mask buffer: keep the buffer to restore
        if name == "weight" and "weight_orig" in self._parameters and "weight_mask" in self._buffers:
            self.__dict__["_sparsekern_pruned_mask"] = self._buffers["weight_mask"]
        super().__delattr__(name)

    def register_parameter(self, name: str, param) -> None:
        super().register_parameter(name, param)  # type: ignore[misc]
        kept = self.__dict__.pop("_sparsekern_pruned_mask", None) if name == "weight" else None
        if kept is not None and "weight_mask" not in self._buffers:
            self._buffers["weight_mask"] = kept

    # ------------------------------------------------------------------ compact gradient
    #: ``"dense"``: the weight gradient is ``weight.grad`` (as ``nn.Linear``); ``"compact"``: it is
    #: :attr:`grad_values`, one value per entry of ``G`` (see :meth:`set_grad_layout`)
    grad_layout: str = "dense"

    def set_grad_layout(self, layout: str) -> None:
        """Where the backward puts the weight gradient.

        ``"dense"`` (the default): in ``weight.grad``, of the weight's shape, exactly zero outside
        ``G`` -- what ``torch.optim``, gradient clipping and hooks on ``weight`` expect.

        ``"compact"``: in :attr:`grad_values`, ``[nnz(G)]`` values on the positions
        :attr:`grad_index` (row-major), and ``weight.grad`` stays ``None``.  The dense ``dW``
        (as large as the weight) is never written or zeroed.  Only :mod:`sparsekern.optim`'s
        optimizers step such a layer (they read :attr:`grad_values`); a stock ``torch.optim``
        optimizer would leave its weight unchanged.  :meth:`weight_grad` gives the dense gradient
        when one is needed.  Under ``torch.compile`` the traced op returns a dense ``weight.grad``.
        """
        if layout not in GRAD_LAYOUTS:
            raise ValueError(f"layout: expected one of {GRAD_LAYOUTS}, got {layout!r}")
        self.grad_layout = layout
        self.__dict__.pop("_sparsekern_sink", None)

    @property
    def grad_values(self) -> torch.Tensor | None:
        """The compact weight gradient (``[nnz(G)]``, on :attr:`grad_index`), or ``None``."""
        sink = self.__dict__.get("_sparsekern_sink")
        return None if sink is None else sink.leaf.grad

    @property
    def grad_index(self) -> torch.Tensor:
        """Row-major flat positions of :attr:`grad_values`: those of ``G`` at the last forward
        (of the current ``G`` before any)."""
        sink = self.__dict__.get("_sparsekern_sink")
        return sink.index if sink is not None else self._flat_grad_index()

    def weight_grad(self) -> torch.Tensor | None:
        """The dense weight gradient in either layout: ``weight.grad`` plus :attr:`grad_values`
        scattered onto the weight's shape; ``None`` if there is neither."""
        dense, vals = self._stored_weight().grad, self.grad_values
        if vals is None:
            return dense
        out = torch.zeros_like(self._stored_weight()) if dense is None else dense.clone()
        out.view(-1).index_add_(0, self.grad_index.long(), vals.to(out.dtype))
        return out

    def zero_grad_values(self) -> None:
        """Drop :attr:`grad_values` (``sparsekern.optim``'s ``step`` and ``zero_grad`` call it)."""
        sink = self.__dict__.get("_sparsekern_sink")
        if sink is not None:
            sink.leaf.grad = None

    def _flat_grad_index(self) -> torch.Tensor:
        from ..formats import flat_index

        return flat_index(self._call_info()[2])

    def _grad_sink(self) -> torch.Tensor | None:
        """The leaf the next forward passes as ``sink`` (compact layout, weight trainable), sized to
        the current ``G``; a gradient it already holds for an older ``G`` moves onto the new one."""
        w = self._stored_weight()
        if self.grad_layout != "compact" or not w.requires_grad or not torch.is_grad_enabled():
            return None
        G, M = self.grad_mask, self.weight_mask
        key = (id(G), G._version, id(M), M._version, w.device, w.dtype)
        sink = self.__dict__.get("_sparsekern_sink")
        if sink is not None and sink.key == key:
            return sink.leaf
        index = self._flat_grad_index()
        new = _GradSink(key, index, w)
        if sink is not None and sink.leaf.grad is not None:
            from ..optim import _remap

            new.leaf.grad = _remap(sink.leaf.grad.to(w.device, w.dtype), sink.index, index)
        self.__dict__["_sparsekern_sink"] = new
        return new.leaf

    def density(self) -> float:
        """Fraction of weights in ``weight_mask``."""
        return float(self.weight_mask.sum()) / self.weight_mask.numel()

    def grad_density(self) -> float:
        """Fraction of weights in ``grad_mask``."""
        return float(self.grad_mask.sum()) / self.grad_mask.numel()

    def sparsity(self) -> float:
        return 1.0 - self.density()

    def selected_backend(self, device=None, dtype=None) -> str:
        """Name of the backend this layer's next call would run on (``device``/``dtype``: the weight's)."""
        from .._backends import select_backend

        return select_backend(self._call_info(device, dtype)[0], self.backend).name

    def _prepare_metadata(self, batch: int | None = None) -> None:
        """Build the index metadata the next forward and backward read on the selected backend
        (``batch``: rows of a linear layer's input), as the first call after a mask change would."""
        from .._backends import select_backend

        info, pattern, gpattern = self._call_info()
        select_backend(info, self.backend).prepare(info, pattern, gpattern, batch)

    def _call_info(self, device=None, dtype=None):
        """``(CallInfo, weight pattern, gradient pattern)`` of this layer's next call."""
        from .._backends import CallInfo, ConvParams
        from ..ops._common import grad_pattern, weight_pattern

        pattern = weight_pattern(self.weight_mask, self.layout, self.block_size)
        gpattern = grad_pattern(pattern, self.grad_mask)
        op = "conv2d" if self.weight.dim() == 4 else "linear"
        conv = None
        if op == "conv2d":
            pad = self.padding if isinstance(self.padding, tuple) else (0, 0)
            conv = ConvParams(self.stride, pad, self.dilation, self.groups)
        info = CallInfo(
            op,
            torch.device(device) if device is not None else self.weight.device,
            dtype or self.weight.dtype,
            pattern.layout,
            pattern.block_size,
            gpattern.layout,
            conv,
            tuple(self.weight.shape),
        )
        return info, pattern, gpattern

    def _note_choice(self) -> None:
        """Record what the call that just ran was decided to run on (see :func:`sparsekern.explain`);
        the first call per device and dtype also warns about a fall-back (:meth:`_warn_fallback`)."""
        from .. import choice
        from .._backends import is_automatic

        self.last_choice = choice.last_decision() if is_automatic(self.backend) else None
        key = (self.weight.device.type, self.weight.dtype)
        warned = self.__dict__.setdefault("_sparsekern_fallbacks", set())
        if key not in warned:
            warned.add(key)
            self._warn_fallback()

    def _warn_fallback(self) -> None:
        """Warn (once per layer, device and dtype) when the automatic order passed over a built
        backend that refuses this layer's calls (a grouped conv, a dtype), naming where it runs."""
        from .._backends import AUTO_ORDER, _check, get_backend, is_automatic

        if not is_automatic(self.backend):
            return
        info = self._call_info()[0]
        refused = []
        for name in AUTO_ORDER.get(info.device.type, ()):
            ok, why = _check(name, info)
            if ok:
                break
            if get_backend(name).available()[0]:  # built but refusing: a property of this layer
                refused.append(f"{name!r} refuses it ({why})")
        if refused:
            warnings.warn(
                f"sparsekern: {type(self).__name__}{tuple(self.weight.shape)} ({info.dtype}) runs on backend "
                f"{name!r}: " + "; ".join(refused),
                stacklevel=4,
            )

    def _sparse_repr(self) -> str:
        s = f", density={self.density():.4f}, layout={self.layout}"
        if self.layout == "block":
            s += f", block_size={self.block_size}"
        if self.backend is not None:
            s += f", backend={self.backend}"
        return s

    def _masked_weight(self) -> torch.Tensor:
        return self.weight.detach().masked_fill(~self.weight_mask, 0)

    @torch.no_grad()
    def _copy_from(self, module: nn.Module, weight: torch.Tensor, mask, sparsity: float, share: bool = False) -> None:
        """Copy a dense module's weights (``share``: take its weight and bias Parameters themselves,
        for a layer built on the meta device: no weight-sized copy), then set ``mask`` (or a
        magnitude mask at ``sparsity``; ``"nonzero"``: the weight's nonzero pattern)."""
        mask = _from_dense_mask(weight, mask, sparsity, type(module).__name__)
        if share:
            self.weight, self.bias = weight, module.bias
            ones = torch.ones_like(weight, dtype=torch.bool)
            self._buffers["weight_mask"] = ones  # replacing the meta buffers (not a prune mask to merge)
            self._buffers["grad_mask"] = ones.clone()
        else:
            self.weight.copy_(weight)
            if module.bias is not None:
                self.bias.copy_(module.bias)
        if mask is not None:
            self.set_mask(mask)
        elif sparsity:
            self.set_mask(magnitude_mask(self.weight, sparsity, layout=self.layout, block_size=self.block_size))
        self.train(module.training)

    def _dense_copy(self, out: nn.Module) -> nn.Module:
        with torch.no_grad():
            out.weight.copy_(self._masked_weight())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        out.train(self.training)
        return out

    # ------------------------------------------------------------------ state dict
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # torch.nn.utils.prune stores the weight as `weight_orig` next to a float `weight_mask`.
        orig = prefix + "weight_orig"
        if orig in state_dict and prefix + "weight" not in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(orig)
        for name in ("weight_mask", "grad_mask"):
            key = prefix + name
            if key in state_dict and isinstance(state_dict[key], torch.Tensor):
                try:
                    state_dict[key] = _zero_one(state_dict[key], key)
                except (TypeError, ValueError) as exc:
                    error_msgs.append(str(exc))
                    return
        has_mask = prefix + "weight_mask" in state_dict
        has_grad = prefix + "grad_mask" in state_dict
        if has_mask and not has_grad:
            state_dict[prefix + "grad_mask"] = state_dict[prefix + "weight_mask"].clone()
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._invalidate_masks()
        # A dense nn.Linear / nn.Conv2d state dict has no masks: keep the current ones.
        for name in ("weight_mask", "grad_mask"):
            key = prefix + name
            if key in missing_keys:
                missing_keys.remove(key)
        if has_mask and bool((self.grad_mask & ~self.weight_mask).any()):
            error_msgs.append(f"{prefix}grad_mask: must be a subset of weight_mask")


#: ``from_dense`` warns when a weight without a mask has more exact zeros than this fraction
MOSTLY_ZERO = 0.5


def _from_dense_mask(weight: torch.Tensor, mask, sparsity: float, kind: str):
    if isinstance(mask, str):
        if mask != "nonzero":
            raise ValueError(f"mask: expected a tensor, None or 'nonzero', got {mask!r}")
        return weight != 0
    if mask is None and not sparsity and weight.numel():
        zeros = 1.0 - float(weight.count_nonzero()) / weight.numel()
        if zeros > MOSTLY_ZERO:
            warnings.warn(
                f"from_dense: the {kind} weight {tuple(weight.shape)} is {zeros:.0%} zeros but no mask or sparsity "
                "was given, so the sparse layer keeps every connection (density 1.0) and computes the zeros; "
                "pass mask='nonzero' to take the zero pattern (or mask= / sparsity=)",
                stacklevel=4,
            )
    return mask


def mask_from_module(module: nn.Module):
    """The mask a dense module carries from ``torch.nn.utils.prune``, or ``None``."""
    m = getattr(module, "weight_mask", None)
    return m if isinstance(m, torch.Tensor) else None


def shareable(module: nn.Module, weight: torch.Tensor) -> bool:
    """Whether ``from_dense(share=True)`` can take ``module``'s Parameters as they are."""
    b = module.bias
    return isinstance(weight, nn.Parameter) and (b is None or isinstance(b, nn.Parameter))


def dense_weight_of(module: nn.Module) -> torch.Tensor:
    """The stored dense weight of a module, ``weight_orig`` for a pruned one."""
    w = getattr(module, "weight_orig", None)
    return w if isinstance(w, torch.Tensor) else module.weight
