"""Argument checks and mask handling shared by the public ops."""

from __future__ import annotations

import torch

from ..formats import LAYOUTS, Pattern, _state, block_grid, checking_masks, pattern_of

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# what torch.autocast casts (its "eligible" tensors): floating, not float64
_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts a matmul / conv on ``x``'s device to, or ``None`` outside
    autocast (or on a device type autocast does not cover)."""
    if not isinstance(x, torch.Tensor):
        return None  # the argument checks say what is wrong
    dev = x.device.type
    try:
        enabled = torch.is_autocast_enabled(dev)
    except (RuntimeError, TypeError):  # a device type without autocast support
        return None
    return torch.get_autocast_dtype(dev) if enabled else None


def autocast_cast(dtype: torch.dtype, *tensors):
    """``tensors`` cast to ``dtype`` as ``nn.Linear`` / ``nn.Conv2d`` are under autocast: floating
    non-float64 tensors only, ``None`` kept.  The casts are differentiable, so gradients reach the
    (fp32 master) parameters in their own dtype."""
    return tuple(t.to(dtype) if t is not None and t.dtype in _AUTOCAST_ELIGIBLE else t for t in tensors)


def check_tensor(t, name: str, *, dim=None, dtype=None, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() not in (dim if isinstance(dim, tuple) else (dim,)):
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (matching the weight), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the weight's device), got {t.device}")


def check_weight(weight, name: str = "weight") -> None:
    check_tensor(weight, name)
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype {_FLOAT_DTYPES}, got {weight.dtype}")


def check_mask(mask, weight, name: str) -> None:
    if isinstance(mask, Pattern):
        mask = mask.mask
    check_tensor(mask, name)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype torch.bool, got {mask.dtype} (use `{name} != 0` to convert)")
    if mask.shape != weight.shape:
        raise ValueError(f"{name}: expected the weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"{name}: expected a tensor on {weight.device} (the weight's device), got {mask.device}")


def weight_pattern(mask, layout: str, block_size) -> Pattern:
    if isinstance(mask, Pattern):
        return mask
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return pattern_of(mask, layout, block_size)


def grad_pattern(pattern: Pattern, grad_mask) -> Pattern:
    """Pattern of the effective gradient mask ``G & M``, derived once per version of ``G`` and ``M``.

    When ``G & M == M`` the weight pattern itself is returned.  A block weight layout keeps a
    block gradient layout when ``G`` is constant on the same tiles, else the gradient pattern is
    unstructured.  The result lives in the weight pattern's cache (see
    :class:`~sparsekern.formats.MetaCache`) and depends on ``G`` and on ``M``'s current contents.
    """
    if grad_mask is None:
        return pattern
    if isinstance(grad_mask, Pattern):
        return grad_mask
    return _grad_entry(pattern, grad_mask, lambda: _effective_grad_pattern(pattern, grad_mask & pattern.mask, None))


def seed_grad_pattern(pattern: Pattern, grad_mask: torch.Tensor, equal: bool) -> Pattern:
    """Cache what :func:`grad_pattern` returns, for a caller that has just written ``grad_mask``
    as a subset of ``pattern.mask`` and knows whether the two are ``equal`` (saves the
    ``G & M`` pass and the comparison at the next call)."""
    # not equal: G & M == G, as a tensor of its own (metadata is built lazily, maybe after a
    # later write to grad_mask)
    return _grad_entry(
        pattern, grad_mask, lambda: _effective_grad_pattern(pattern, None if equal else grad_mask.clone(), equal)
    )


def _grad_entry(pattern: Pattern, grad_mask: torch.Tensor, build) -> Pattern:
    key = ("grad_pattern", pattern.layout, pattern.block_size)
    return pattern.derived(key, build, deps=(grad_mask, pattern.mask))


def _effective_grad_pattern(pattern: Pattern, eff: torch.Tensor | None, equal: bool | None) -> Pattern:
    """The pattern of ``eff = G & M`` (``equal``: whether it is ``M``, ``None``: not known yet)."""
    if equal is None:
        equal = torch.equal(eff, pattern.mask)
    if equal:
        return pattern
    if pattern.layout == "block":
        grid, constant = block_grid(eff.reshape(eff.shape[0], -1), *pattern.block_size)
        if constant:  # the tile grid is kept for bsr()
            pat = Pattern(eff, "block", pattern.block_size)
            pat.derived(("block_grid", pat.block_size), lambda: grid)
            return pat
    return Pattern(eff, "unstructured", None)


def mask_guard(*masks) -> tuple:
    """What a forward records of its masks (tensors, patterns or ``None``), so its backward can
    tell whether they changed: each mask with its version (and, under ``SPARSEKERN_CHECK_MASKS``,
    its checksum)."""
    check = checking_masks()
    seen: dict[int, tuple] = {}
    for m in masks:
        m = m.mask if isinstance(m, Pattern) else m
        if m is not None:
            seen.setdefault(id(m), (m, _state(m, check)))
    return tuple(seen.values())


def check_mask_guard(guard: tuple, op: str) -> None:
    """Raise if a mask recorded by :func:`mask_guard` was written since: the backward would
    otherwise read the new mask's metadata for a forward computed with the old one."""
    for mask, (version, checksum) in guard:
        if mask._version != version or (checksum is not None and _state(mask, True)[1] != checksum):
            raise RuntimeError(
                f"mask: changed between the forward and the backward of {op}; change masks "
                "(set_mask, set_grad_mask, load_state_dict) only after backward() has run"
            )
