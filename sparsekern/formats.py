"""Sparse layouts: index metadata derived from a boolean weight mask.

A weight of shape ``[out, in]`` (linear) or ``[out, in/groups, kh, kw]`` (conv) is seen as the
matrix ``[out, in/groups * kh * kw]``.  From its boolean mask this module builds, on the mask's
device, the metadata kernels read:

* :class:`CSRMeta` -- the *unstructured* layout: CSR over output rows, plus the transposed
  metadata (CSC: ``ccol_indices`` / ``row_indices``) and ``transpose_perm``, the position of each
  CSC entry in CSR order, so a kernel that walks columns (the input gradient) can read the same
  values array without atomics.
* :class:`BSRMeta` -- the *block* layout ``(bo, bk)``: the same structure over tiles of the
  matrix padded up to a multiple of the block.

:class:`Pattern` bundles a mask with its layout and builds either metadata lazily, once.

Derived data lives in one place, a :class:`MetaCache`.  :func:`pattern_of` keeps one per mask
tensor, keyed by the tensor's identity and its version counter (any in-place write to the mask
bumps it): the pattern, its CSR / BSR metadata, the effective gradient pattern and whatever a
backend derives from them (column windows, walk orders) are built once and rebuilt only when the
mask changes.  Backends ask for what they need with ``pattern.derived(key, build)`` or
``meta.derived(key, build)`` instead of keeping caches of their own.

What is detected.  By default (no per-call work proportional to the mask): every write that
bumps the version counter -- ``set_mask`` / ``set_grad_mask``, ``load_state_dict``, in-place
torch ops on the buffer (``copy_``, ``fill_``, indexing), a buffer replaced by a new tensor
(``torch.nn.utils.prune``, ``load_state_dict(assign=True)``) -- and a mask written between a
forward and its backward (that backward raises).  Not detected by default: writes that bypass the
counter -- ``mask.data.fill_(...)``, a NumPy view (``mask.numpy()[...] = ...``), DDP's buffer
broadcast or any other write through the raw storage.  After such a write, call
:func:`invalidate` on the mask (or write it with the module's ``set_mask``).  With
``SPARSEKERN_CHECK_MASKS=1`` (the test suite sets it) every cache lookup and every backward
also compares a content checksum of the mask (:func:`mask_checksum`, one pass over it): a cache
whose mask changed behind the counter is rebuilt, and a backward whose mask changed raises.

Block sizes inside the library are :class:`BlockSize` tiles in matrix units; users give an int or
a pair in channel units, which :meth:`BlockSize.of` converts once, at the boundary.

Indices are ``int32`` unless a dimension or the number of nonzeros would overflow it, in which
case ``int64`` is used.

On the CPU, when the C++ extension is built, the metadata and the tile reductions come from its
ops (``csr_from_mask``, ``tile_any_all`` in ``csrc/cpu/build_meta.cpp``); they return exactly the
tensors of the pure-PyTorch builders here (``_build_csr_torch``, ``_tile_any_all_torch``), which
are the specification and run everywhere else.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch

__all__ = [
    "SUPPORTED_BLOCK_SIZES",
    "LAYOUTS",
    "BlockSize",
    "MetaCache",
    "meta_cache",
    "invalidate",
    "mask_checksum",
    "checking_masks",
    "CSRMeta",
    "BSRMeta",
    "Pattern",
    "flat_index",
    "as_matrix",
    "normalize_block_size",
    "build_csr",
    "build_bsr",
    "block_mask_of",
    "expand_block_mask",
    "is_block_constant",
    "pattern_of",
    "to_torch_sparse_csr",
    "to_torch_sparse_bsr",
    "from_torch_sparse",
]

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
LAYOUTS = ("unstructured", "block")
_INT32_MAX = 2**31 - 1


def _index_dtype(*sizes: int) -> torch.dtype:
    """int32 unless any size would overflow it."""
    return torch.int32 if max(sizes, default=0) <= _INT32_MAX else torch.int64


def _csr_index_dtype(rows: int, cols: int, count_nnz) -> torch.dtype:
    """The index dtype of a ``rows x cols`` pattern: :func:`_index_dtype` of ``rows + 1``,
    ``cols + 1`` and nnz.  ``count_nnz()`` is called only when ``rows * cols`` (a bound on nnz)
    would overflow int32, so ordinary layers never count their nonzeros for it."""
    if _index_dtype(rows + 1, cols + 1, rows * cols) == torch.int32:
        return torch.int32
    return _index_dtype(rows + 1, cols + 1, int(count_nnz()))


_NATIVE: list = []


def _native(t: torch.Tensor):
    """``torch.ops.sparsekern`` when ``t`` is on the CPU and the C++ extension is loaded, else None."""
    if t.device.type != "cpu":
        return None
    if not _NATIVE:
        ops = None
        try:
            from .kernels.cpu import load_library

            if load_library()[0]:
                ops = torch.ops.sparsekern
        except Exception:  # pragma: no cover - an extension that fails to load: the torch builders run
            ops = None
        _NATIVE.append(ops)
    return _NATIVE[0]


def as_matrix(mask: torch.Tensor) -> torch.Tensor:
    """View a 2-D (linear) or 4-D (conv) mask as the matrix ``[out, rest]``."""
    if mask.dim() == 2:
        return mask
    if mask.dim() == 4:
        return mask.reshape(mask.shape[0], -1)
    raise ValueError(
        f"mask: expected a 2-D [out, in] or 4-D [out, in/groups, kh, kw] tensor, got shape {tuple(mask.shape)}"
    )


def normalize_block_size(block_size, *, name: str = "block_size") -> tuple[int, int]:
    """Turn ``16`` or ``(16, 32)`` into a validated ``(bo, bk)`` pair."""
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        pair = (block_size, block_size)
    elif isinstance(block_size, (tuple, list)) and len(block_size) == 2:
        pair = (block_size[0], block_size[1])
    else:
        raise ValueError(f"{name}: expected an int or a pair of ints from {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
    for b in pair:
        if not isinstance(b, int) or isinstance(b, bool) or b not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"{name}: block sides must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
    return pair


def _taps(shape: Sequence[int]) -> int:
    """Kernel taps ``kh * kw`` of a 4-D conv weight shape (1 for a linear one)."""
    return shape[2] * shape[3] if len(shape) == 4 else 1


class BlockSize(NamedTuple):
    """A block tile in matrix units: ``rows`` x ``cols`` entries of the ``[out, in/groups*kh*kw]``
    matrix view of a weight.

    The one unit of block sizes inside the library: :attr:`Pattern.block_size`,
    :attr:`BSRMeta.block`, ``CallInfo.block_size`` and the C++ ops' ``block`` argument are all
    matrix tiles.  Users give channel units instead -- ``b`` or ``(bo, bk)``: ``bo`` output by
    ``bk`` input channels, spanning every kernel tap of a conv -- and :meth:`of` converts them, once,
    at the boundary; :meth:`channels` converts back.  A ``BlockSize`` compares and unpacks like the
    pair ``(rows, cols)`` and prints as one.
    """

    rows: int
    cols: int

    def __str__(self) -> str:
        return str(tuple(self))

    @classmethod
    def of(cls, block_size, shape: Sequence[int] = (), *, name: str = "block_size") -> BlockSize:
        """The matrix tile of a user block size for a weight (or mask) of ``shape``.

        Args:
            block_size: ``b`` or ``(bo, bk)`` in channel units, sides in
                :data:`SUPPORTED_BLOCK_SIZES` (for a 4-D ``shape`` the column side is multiplied by
                ``kh*kw``); a ``BlockSize`` is already in matrix units and is returned as it is.
            shape: the weight's shape; ``()`` reads ``block_size`` as a matrix tile directly.

        Raises:
            ValueError: ``block_size`` is not an int or a pair of supported sides.
        """
        if isinstance(block_size, BlockSize):
            return block_size
        bo, bk = normalize_block_size(block_size, name=name)
        return cls(bo, bk * _taps(shape))

    def channels(self, shape: Sequence[int], *, name: str = "block_size") -> tuple[int, int]:
        """``(bo, bk)`` in channel units for a weight of ``shape`` (the inverse of :meth:`of`)."""
        taps = _taps(shape)
        if self.cols % taps:
            raise ValueError(f"{name}: block {self} does not span whole input channels of a {tuple(shape)} weight")
        return self.rows, self.cols // taps


CHECK_VAR = "SPARSEKERN_CHECK_MASKS"


def checking_masks() -> bool:
    """Whether ``SPARSEKERN_CHECK_MASKS`` asks for content checksums (read at call time)."""
    return os.environ.get(CHECK_VAR, "").strip().lower() not in ("", "0", "false", "no", "off")


def mask_checksum(mask: torch.Tensor) -> int:
    """A cheap content checksum of a boolean mask: one pass over its bytes, read 8 at a time.

    Each 8-byte word is multiplied by a distinct odd number and the products summed (wrapping
    int64 arithmetic), so any change of a single entry changes the sum.  A host sync on a GPU.
    """
    b = mask.detach().contiguous().view(-1)
    b = b.view(torch.uint8) if b.dtype == torch.bool else (b != 0).view(torch.uint8)
    pad = (-b.numel()) % 8
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    words = b.view(torch.int64)
    odd = torch.arange(words.numel(), dtype=torch.int64, device=words.device).mul_(2).add_(1)
    return int(words.mul(odd).sum()) ^ b.numel()


def _state(t: torch.Tensor, check: bool) -> tuple:
    """What a cache compares to tell whether ``t`` changed: its version, and its checksum if ``check``."""
    return (t._version, mask_checksum(t) if check else None)


def _as_key(key: Hashable) -> tuple:
    return key if isinstance(key, tuple) else (key,)


class MetaCache:
    """Everything derived from one boolean mask, built on first use and kept until the mask changes.

    :func:`meta_cache` finds the cache of a mask tensor: it compares the tensor's identity and
    version counter with those the cache was filled for and starts a new, empty cache when either
    differs, so nothing derived from an old mask outlives a change and nothing is rebuilt while the
    mask stays the same.  A :class:`Pattern` or metadata object keeps the cache it was built with,
    so it stays consistent with the mask version it describes.

    Keys are tuples whose first item names the kind of entry; data derived from a cached metadata
    object extends that object's key.  What :func:`pattern_of`'s cache holds:

    * ``("pattern", layout, block)``: the :class:`Pattern` itself;
    * ``("csr",)``, ``("bsr", block)``: :class:`CSRMeta` / :class:`BSRMeta` (``Pattern.csr()`` /
      ``Pattern.bsr()``); ``("nnz",)``: the number of stored entries;
    * ``("block_grid", block)``: the tile-any grid of a block pattern (kept from the check of a
      block mask, read by ``Pattern.bsr()``);
    * ``("grad_pattern", layout, block)``: the effective gradient pattern ``G & M``, which also
      depends on ``G`` (see ``deps`` in :meth:`get`);
    * backend data, e.g. ``("csr", "cpp.windows", transposed, window)`` (column windows of the
      ``cpp`` backend) and ``("bsr", block, "triton.walk_orders")`` (the Triton walk orders).

    Derived data never travels: a pickled or deep-copied cache arrives empty.
    """

    __slots__ = ("_owner", "_version", "_checksum", "_items")

    def __init__(self, mask: torch.Tensor | None = None) -> None:
        self._owner = None if mask is None else id(mask)
        self._version = None if mask is None else mask._version
        #: the mask's content checksum when it was built under SPARSEKERN_CHECK_MASKS, else None
        self._checksum = mask_checksum(mask) if mask is not None and checking_masks() else None
        self._items: dict[tuple, tuple[tuple, Any]] = {}

    def describes(self, mask: torch.Tensor) -> bool:
        """Whether this is the cache of ``mask`` as it is now (same tensor, same version and,
        under ``SPARSEKERN_CHECK_MASKS``, same content)."""
        if self._owner != id(mask) or self._version != mask._version:
            return False
        if not checking_masks():
            return True
        return self._checksum == mask_checksum(mask)

    def get(self, key: Hashable, build: Callable[[], Any], *, deps: Sequence[torch.Tensor] = ()) -> Any:
        """The entry ``key``, made by ``build()`` on first use.

        ``deps``: other tensors the entry depends on; it is rebuilt when any of them is a different
        tensor or has been written to since it was built.
        """
        key = _as_key(key)
        check = checking_masks()
        sig = tuple((d, _state(d, check)) for d in deps)
        hit = self._items.get(key)
        if (
            hit is not None
            and len(hit[0]) == len(sig)
            and all(a is b and (va[0], va[1] if check else None) == sb for (a, va), (b, sb) in zip(hit[0], sig))
        ):
            return hit[1]
        value = build()
        self._items[key] = (sig, value)
        return value

    def peek(self, key: Hashable) -> Any:
        """The entry ``key`` if it has been built, else ``None`` (builds nothing)."""
        hit = self._items.get(_as_key(key))
        return None if hit is None else hit[1]

    def keys(self) -> list[tuple]:
        """The keys of the entries built so far."""
        return list(self._items)

    def __reduce__(self):
        return (MetaCache, ())


_CACHE_ATTR = "_sparsekern_meta"


def meta_cache(mask: torch.Tensor) -> MetaCache:
    """The :class:`MetaCache` of ``mask`` as it is now (a new, empty one after any change)."""
    cache = getattr(mask, _CACHE_ATTR, None)
    if cache is None or not cache.describes(mask):
        cache = MetaCache(mask)
        try:
            setattr(mask, _CACHE_ATTR, cache)
        except (AttributeError, RuntimeError):  # pragma: no cover - tensor subclasses without __dict__
            pass
    return cache


def invalidate(mask: torch.Tensor) -> None:
    """Drop everything cached for ``mask``: call it after writing the mask behind its version
    counter (``mask.data``, a NumPy view, DDP's buffer broadcast).  The modules' ``set_mask``,
    ``set_grad_mask`` and ``load_state_dict`` invalidate by themselves."""
    if getattr(mask, _CACHE_ATTR, None) is not None:
        setattr(mask, _CACHE_ATTR, None)


def _check_bool_mask(mask: torch.Tensor, name: str = "mask") -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype torch.bool, got {mask.dtype}")


# --------------------------------------------------------------------------------------------
# unstructured: CSR + transposed metadata
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CSRMeta:
    """CSR over rows of a ``[rows, cols]`` matrix plus its transpose.

    Attributes:
        shape: ``(rows, cols)``.
        crow_indices: ``[rows + 1]``, row ``r``'s entries are ``crow[r]:crow[r+1]``.
        col_indices: ``[nnz]``, column of each entry, ascending within a row.
        ccol_indices: ``[cols + 1]``, the same for columns (CSC).
        row_indices: ``[nnz]``, row of each CSC entry, ascending within a column.
        transpose_perm: ``[nnz]``, CSR position of each CSC entry.
        nnz: number of stored entries (a host int).

    Data derived from it goes through :meth:`derived`: into the mask's :class:`MetaCache` when
    the metadata came from a :class:`Pattern`, else into a cache of its own.
    """

    shape: tuple[int, int]
    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    ccol_indices: torch.Tensor
    row_indices: torch.Tensor
    transpose_perm: torch.Tensor
    nnz: int
    _cache: MetaCache = field(default_factory=MetaCache, repr=False, compare=False)
    _key: tuple = field(default=(), repr=False, compare=False)

    def derived(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """Data derived from this metadata, built by ``build()`` once (see :class:`MetaCache`)."""
        return self._cache.get(self._key + _as_key(key), build)

    @property
    def device(self) -> torch.device:
        return self.crow_indices.device

    @property
    def density(self) -> float:
        rows, cols = self.shape
        return self.nnz / (rows * cols) if rows * cols else 0.0

    def row_ids(self) -> torch.Tensor:
        """Row of each CSR entry (``[nnz]``, int64)."""
        counts = (self.crow_indices[1:] - self.crow_indices[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.shape[0], device=self.device), counts)

    def to_mask(self) -> torch.Tensor:
        rows, cols = self.shape
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=self.device)
        mask[self.row_ids(), self.col_indices.long()] = True
        return mask

    def validate(self) -> None:
        """Check every invariant; raise ``ValueError`` naming the first one broken."""
        _validate_compressed(self.shape, self.crow_indices, self.col_indices, self.nnz, "crow_indices", "col_indices")
        _validate_compressed(
            (self.shape[1], self.shape[0]), self.ccol_indices, self.row_indices, self.nnz, "ccol_indices", "row_indices"
        )
        perm = self.transpose_perm
        if perm.shape != (self.nnz,):
            raise ValueError(f"transpose_perm: expected shape ({self.nnz},), got {tuple(perm.shape)}")
        if self.nnz:
            if bool((perm < 0).any()) or bool((perm >= self.nnz).any()):
                raise ValueError("transpose_perm: entries must lie in [0, nnz)")
            seen = torch.zeros(self.nnz, dtype=torch.bool, device=perm.device)
            seen[perm.long()] = True
            if not bool(seen.all()):
                raise ValueError("transpose_perm: not a permutation of [0, nnz)")
            rows = self.row_ids()[perm.long()]
            cols = self.col_indices.long()[perm.long()]
            t_cols = torch.repeat_interleave(
                torch.arange(self.shape[1], device=perm.device),
                (self.ccol_indices[1:] - self.ccol_indices[:-1]).long(),
            )
            if not (torch.equal(rows, self.row_indices.long()) and torch.equal(cols, t_cols)):
                raise ValueError("transpose_perm: CSC entries do not map to the same (row, col) in CSR")


def _validate_compressed(shape, cptr, idx, nnz, cname, iname) -> None:
    n_major, n_minor = shape
    for name, t in ((cname, cptr), (iname, idx)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: expected int32 or int64 indices, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor")
    if cptr.numel() != n_major + 1:
        raise ValueError(f"{cname}: expected {n_major + 1} entries, got {cptr.numel()}")
    if idx.numel() != nnz:
        raise ValueError(f"{iname}: expected nnz={nnz} entries, got {idx.numel()}")
    if int(cptr[0]) != 0 or int(cptr[-1]) != nnz:
        raise ValueError(f"{cname}: must start at 0 and end at nnz={nnz}, got {int(cptr[0])}..{int(cptr[-1])}")
    if n_major and bool((cptr[1:] < cptr[:-1]).any()):
        raise ValueError(f"{cname}: must be non-decreasing")
    if nnz:
        if bool((idx < 0).any()) or bool((idx >= n_minor).any()):
            raise ValueError(f"{iname}: entries must lie in [0, {n_minor})")
        # strictly increasing inside each segment
        diffs = idx[1:].long() - idx[:-1].long()
        starts = torch.zeros(nnz, dtype=torch.bool, device=idx.device)
        seg_starts = cptr[:-1].long()
        seg_starts = seg_starts[seg_starts < nnz]
        starts[seg_starts] = True
        if bool(((diffs <= 0) & ~starts[1:]).any()):
            raise ValueError(f"{iname}: must be strictly increasing within each row/column")


def _compressed(major: torch.Tensor, minor: torch.Tensor, n_major: int, dtype: torch.dtype):
    counts = torch.bincount(major, minlength=n_major)
    ptr = torch.zeros(n_major + 1, dtype=dtype, device=major.device)
    ptr[1:] = torch.cumsum(counts, 0).to(dtype)
    return ptr, minor.to(dtype).contiguous()


def build_csr(mask: torch.Tensor) -> CSRMeta:
    """CSR + transposed metadata of a 2-D (or 4-D conv) boolean mask, built on its device."""
    _check_bool_mask(mask)
    m = as_matrix(mask)
    ops = _native(m)
    if ops is None:
        return _build_csr_torch(m)
    rows, cols = m.shape
    dtype = _csr_index_dtype(rows, cols, m.count_nonzero)
    crow, col, ccol, row_t, perm = ops.csr_from_mask(m, dtype)
    return CSRMeta((rows, cols), crow, col, ccol, row_t, perm, col.numel())


def _build_csr_torch(mask: torch.Tensor) -> CSRMeta:
    """:func:`build_csr` in PyTorch ops: the specification of the C++ builder, and the builder on GPUs."""
    _check_bool_mask(mask)
    m = as_matrix(mask)
    rows, cols = m.shape
    nz = m.nonzero()  # row-major order: CSR order
    nnz = nz.shape[0]
    dtype = _csr_index_dtype(rows, cols, lambda: nnz)
    r, c = nz[:, 0], nz[:, 1]
    crow, col = _compressed(r, c, rows, dtype)
    # CSC order: sort by (col, row); CSR position i of entry i is its index in nz.
    key = c * max(rows, 1) + r
    perm = torch.argsort(key, stable=True)
    ccol, row_t = _compressed(c[perm], r[perm], cols, dtype)
    return CSRMeta((rows, cols), crow, col, ccol, row_t, perm.to(dtype).contiguous(), nnz)


# --------------------------------------------------------------------------------------------
# block: BSR + transposed metadata
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BSRMeta:
    """Block-CSR of a ``[rows, cols]`` matrix with ``block = (bo, bk)`` tiles.

    ``padded_shape`` is ``shape`` rounded up to block multiples; ``blocks`` is the structure as a
    :class:`CSRMeta` over the ``[rows/bo, cols/bk]`` grid of tiles (its ``nnz`` is the number of
    stored blocks, and its transposed metadata lets the input gradient walk block columns).
    """

    shape: tuple[int, int]
    block: BlockSize
    blocks: CSRMeta

    def __post_init__(self) -> None:
        if not isinstance(self.block, BlockSize):
            object.__setattr__(self, "block", BlockSize(*self.block))

    @property
    def padded_shape(self) -> tuple[int, int]:
        return (self.blocks.shape[0] * self.block[0], self.blocks.shape[1] * self.block[1])

    @property
    def crow_indices(self) -> torch.Tensor:
        return self.blocks.crow_indices

    @property
    def col_indices(self) -> torch.Tensor:
        return self.blocks.col_indices

    @property
    def ccol_indices(self) -> torch.Tensor:
        return self.blocks.ccol_indices

    @property
    def row_indices(self) -> torch.Tensor:
        return self.blocks.row_indices

    @property
    def transpose_perm(self) -> torch.Tensor:
        return self.blocks.transpose_perm

    @property
    def nnz_blocks(self) -> int:
        return self.blocks.nnz

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def to_mask(self) -> torch.Tensor:
        return expand_block_mask(self.blocks.to_mask(), self.block, self.shape)

    def validate(self) -> None:
        rb = math.ceil(self.shape[0] / self.block[0])
        cb = math.ceil(self.shape[1] / self.block[1])
        if self.blocks.shape != (rb, cb):
            raise ValueError(f"blocks: expected a {rb}x{cb} block grid for shape {self.shape}, got {self.blocks.shape}")
        self.blocks.validate()


def block_mask_of(mask: torch.Tensor, block) -> torch.Tensor:
    """``[ceil(rows/bo), ceil(cols/bk)]`` boolean grid: True where the tile has any True entry.

    ``block``: a matrix tile (an int / pair of supported sides, or a :class:`BlockSize`).
    """
    _check_bool_mask(mask)
    bo, bk = BlockSize.of(block, name="block")
    return block_mask_of_matrix(as_matrix(mask), bo, bk)


def expand_block_mask(block_mask: torch.Tensor, block, shape) -> torch.Tensor:
    """Inverse of :func:`block_mask_of` for block-constant masks, cropped to ``shape``."""
    bo, bk = block
    rb, cb = block_mask.shape
    full = block_mask[:, None, :, None].expand(rb, bo, cb, bk).reshape(rb * bo, cb * bk)  # one copy
    return full[: shape[0], : shape[1]].contiguous()


def build_bsr(mask: torch.Tensor, block) -> BSRMeta:
    """BSR + transposed metadata of a block-constant boolean mask (edges are padded).

    ``block``: a matrix tile (an int / pair of supported sides, or a :class:`BlockSize`).
    """
    blk = BlockSize.of(block, name="block")
    _check_bool_mask(mask)
    m = as_matrix(mask)
    bmask, constant = block_grid(m, *blk)
    if not constant:
        raise ValueError(
            f"mask: layout 'block' {blk} needs a mask that is constant on each {blk[0]}x{blk[1]} tile "
            "(use sparsekern.masks to build block masks, or layout='unstructured')"
        )
    return BSRMeta(tuple(m.shape), blk, build_csr(bmask))


# --------------------------------------------------------------------------------------------
# Pattern: a mask + layout, with cached metadata
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Pattern:
    """A boolean weight mask together with its layout; builds kernel metadata on demand.

    Args:
        mask: boolean tensor of the weight's shape (2-D linear or 4-D conv).
        layout: ``"unstructured"`` or ``"block"``.
        block_size: for ``"block"``: the tile in *matrix* units, a :class:`BlockSize` or a pair
            ``(rows, cols)`` of the ``[out, in/groups*kh*kw]`` view (the column side of a conv tile
            is ``bk * kh * kw``).  Use :func:`pattern_of` to pass channel blocks.

    Everything derived from the mask is built once, on first use, into the pattern's
    :class:`MetaCache` (``derived``): the mask's shared cache for a pattern from
    :func:`pattern_of`, a cache of its own for one constructed directly.
    """

    mask: torch.Tensor
    layout: str = "unstructured"
    block_size: BlockSize | None = None
    _cache: MetaCache | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _check_bool_mask(self.mask)
        if self.mask.dim() not in (2, 4):
            raise ValueError(f"mask: expected 2-D or 4-D, got shape {tuple(self.mask.shape)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {self.layout!r}")
        if self.layout == "block" and self.block_size is None:
            raise ValueError("block_size: required when layout='block'")
        if self.block_size is not None and not isinstance(self.block_size, BlockSize):
            try:
                rows, cols = self.block_size
            except (TypeError, ValueError):
                raise ValueError(
                    f"block_size: expected a BlockSize or a (rows, cols) pair in matrix units, got {self.block_size!r}"
                ) from None
            self.block_size = BlockSize(rows, cols)
        if self._cache is None:
            self._cache = MetaCache()

    @property
    def matrix(self) -> torch.Tensor:
        return as_matrix(self.mask)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mask.shape)

    @property
    def device(self) -> torch.device:
        return self.mask.device

    @property
    def cache(self) -> MetaCache:
        """The :class:`MetaCache` that holds everything derived from this pattern's mask."""
        return self._cache

    def derived(self, key: Hashable, build: Callable[[], Any], *, deps: Sequence[torch.Tensor] = ()) -> Any:
        """Data derived from the mask, built by ``build()`` once (see :meth:`MetaCache.get`)."""
        return self._cache.get(key, build, deps=deps)

    def csr(self) -> CSRMeta:
        return self.derived(("csr",), lambda: replace(build_csr(self.mask), _cache=self._cache, _key=("csr",)))

    def bsr(self) -> BSRMeta:
        if self.layout != "block":
            raise ValueError("bsr(): this pattern has layout 'unstructured'; build a block pattern instead")
        key = ("bsr", self.block_size)

        def build() -> BSRMeta:
            blocks = build_csr(self.block_grid())
            return BSRMeta(tuple(self.matrix.shape), self.block_size, replace(blocks, _cache=self._cache, _key=key))

        return self.derived(key, build)

    def nnz(self) -> int:
        csr = self._cache.peek(("csr",))
        return self.derived(("nnz",), lambda: csr.nnz if csr is not None else int(self.mask.count_nonzero()))

    def block_grid(self) -> torch.Tensor:
        """The tile-any grid of a block pattern (``("block_grid", block)`` in its cache)."""
        return self.derived(
            ("block_grid", self.block_size), lambda: block_mask_of_matrix(self.matrix, *self.block_size)
        )

    def density(self) -> float:
        n = self.mask.numel()
        return self.nnz() / n if n else 0.0

    def validate(self) -> None:
        """Check the mask and any metadata already built; raise ``ValueError`` if inconsistent."""
        if self.layout == "block":  # the grid of the check is kept for bsr()
            grid = checked_block_grid(self.matrix, *self.block_size)
            self.derived(("block_grid", self.block_size), lambda: grid)
        csr = self._cache.peek(("csr",))
        if csr is not None:
            csr.validate()
            if not torch.equal(csr.to_mask(), self.matrix):
                raise ValueError("csr metadata: does not describe the current mask (stale cache?)")
        bsr = self._cache.peek(("bsr", self.block_size)) if self.layout == "block" else None
        if bsr is not None:
            bsr.validate()


def flat_index(pattern: Pattern) -> torch.Tensor:
    """Row-major flat positions of ``pattern``'s mask (``[nnz]``, int32 where they fit, else int64):
    the order of a compact gradient (``linear_dw_values``) and of ``sparsekern.optim``'s state.
    Built once per mask version, from the CSR metadata when it is already there."""

    def build() -> torch.Tensor:
        mask = pattern.mask
        dtype = torch.int32 if mask.numel() <= torch.iinfo(torch.int32).max else torch.int64
        csr = pattern.cache.peek(("csr",))
        if csr is not None:
            cols = csr.shape[1]
            return (csr.row_ids() * cols + csr.col_indices.long()).to(dtype)
        return mask.reshape(-1).nonzero().squeeze(1).to(dtype)

    return pattern.derived(("flat_index",), build)


def block_mask_of_matrix(m: torch.Tensor, bo: int, bk: int) -> torch.Tensor:
    """Tile-any of a 2-D boolean matrix for any positive tile sides (used for conv column tiles)."""
    ops = _native(m)
    if ops is None:
        return _tile_any_all_torch(m, bo, bk)[0]
    return ops.tile_any_all(m, bo, bk)[0]


def block_grid(m: torch.Tensor, bo: int, bk: int) -> tuple[torch.Tensor, bool]:
    """``(tile-any grid, constant)`` of a 2-D boolean matrix in one pass: ``constant`` says
    whether every ``bo x bk`` tile (cropped at the edges) is all True or all False."""
    ops = _native(m)
    anys, alls = _tile_any_all_torch(m, bo, bk) if ops is None else ops.tile_any_all(m, bo, bk)
    return anys, torch.equal(anys, alls)


def checked_block_grid(m: torch.Tensor, bo: int, bk: int) -> torch.Tensor:
    """The tile-any grid of a matrix that must be constant on its ``bo x bk`` tiles (else ``ValueError``)."""
    grid, constant = block_grid(m, bo, bk)
    if not constant:
        raise ValueError(f"mask: not constant on the {bo}x{bk} tiles of layout 'block'")
    return grid


def _tile_any_all_torch(m: torch.Tensor, bo: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile: any entry True, every entry True (padding is outside every tile)."""
    rows, cols = m.shape
    rb, cb = math.ceil(rows / bo), math.ceil(cols / bk)
    padded = torch.zeros(rb * bo, cb * bk, dtype=torch.bool, device=m.device)
    padded[:rows, :cols] = m
    anys = padded.view(rb, bo, cb, bk).any(dim=3).any(dim=1)
    # every in-range entry True <=> the tile-any of the complement is False
    padded[:rows, :cols] = ~m
    alls = ~padded.view(rb, bo, cb, bk).any(dim=3).any(dim=1)
    return anys, alls


def is_block_constant(m: torch.Tensor, block) -> bool:
    """Whether the 2-D boolean matrix ``m`` is constant on every ``block = (bo, bk)`` tile."""
    return block_grid(m, *block)[1]


def pattern_of(mask: torch.Tensor, layout: str = "unstructured", block_size=None, *, name: str = "mask") -> Pattern:
    """The cached :class:`Pattern` of ``mask``; rebuilt only when the mask has been written to.

    ``block_size`` is in channel units ``(out_channels, in_channels)``: for a 4-D conv mask the
    column side of a tile covers ``bk`` input channels times every ``kh*kw`` tap (a
    :class:`BlockSize` is taken as the matrix tile).  The pattern lives in the mask's
    :class:`MetaCache` (:func:`meta_cache`), with everything derived from it.
    """
    _check_bool_mask(mask, name)
    block = pattern_block(mask, layout, block_size)
    cache = meta_cache(mask)

    def build() -> Pattern:
        pat = Pattern(mask, layout, block, cache)
        if layout == "block":
            pat.validate()  # a block layout must be block-constant
        return pat

    return cache.get(("pattern", layout, block), build)


def pattern_block(mask: torch.Tensor, layout: str, block_size) -> BlockSize | None:
    """The matrix tile :func:`pattern_of` uses for ``mask`` (``None`` for ``"unstructured"``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if layout != "block":
        return None
    if block_size is None:
        raise ValueError("block_size: required when layout='block'")
    return BlockSize.of(block_size, mask.shape)


def seed_pattern(mask: torch.Tensor, layout: str, block_size, grid: torch.Tensor | None = None) -> Pattern:
    """The pattern :func:`pattern_of` would return for ``mask`` now, put in its cache without the
    block check: for a caller that has just written ``mask`` from a mask it checked (``grid``: that
    mask's tile-any grid, for layout ``"block"``, kept for ``bsr()``)."""
    block = pattern_block(mask, layout, block_size)
    cache = meta_cache(mask)
    pat = cache.get(("pattern", layout, block), lambda: Pattern(mask, layout, block, cache))
    if grid is not None:
        pat.derived(("block_grid", block), lambda: grid)
    return pat


# --------------------------------------------------------------------------------------------
# torch.sparse interop
# --------------------------------------------------------------------------------------------


def to_torch_sparse_csr(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``torch.sparse_csr`` tensor holding ``weight``'s values at ``mask`` (matrix view)."""
    _check_bool_mask(mask)
    if weight.shape != mask.shape:
        raise ValueError(f"weight: expected shape {tuple(mask.shape)} (the mask's), got {tuple(weight.shape)}")
    meta = build_csr(mask)
    w = as_matrix(weight)
    values = w[meta.row_ids(), meta.col_indices.long()]
    return torch.sparse_csr_tensor(
        meta.crow_indices.long(),
        meta.col_indices.long(),
        values,
        size=meta.shape,
        dtype=weight.dtype,
        check_invariants=True,
    )


def to_torch_sparse_bsr(weight: torch.Tensor, mask: torch.Tensor, block_size) -> torch.Tensor:
    """``torch.sparse_bsr`` tensor of ``weight`` at a block-constant ``mask``.

    ``block_size``: the matrix tile (an int / pair of supported sides, or a :class:`BlockSize`).
    ``torch.sparse`` BSR has no padding, so the matrix shape must be a multiple of the block.
    """
    _check_bool_mask(mask)
    if weight.shape != mask.shape:
        raise ValueError(f"weight: expected shape {tuple(mask.shape)} (the mask's), got {tuple(weight.shape)}")
    blk = BlockSize.of(block_size)
    bo, bk = blk
    m = as_matrix(mask)
    if m.shape[0] % bo or m.shape[1] % bk:
        raise ValueError(
            f"block_size: torch.sparse BSR needs the matrix shape {tuple(m.shape)} to be a multiple of {(bo, bk)}"
        )
    meta = build_bsr(m, blk)
    w = as_matrix(weight)
    rb, cb = meta.blocks.shape
    tiles = w.reshape(rb, bo, cb, bk).permute(0, 2, 1, 3)
    values = tiles[meta.blocks.row_ids(), meta.blocks.col_indices.long()]
    return torch.sparse_bsr_tensor(
        meta.crow_indices.long(),
        meta.col_indices.long(),
        values,
        size=tuple(m.shape),
        dtype=weight.dtype,
        check_invariants=True,
    )


def from_torch_sparse(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dense_values, mask)`` of a ``torch.sparse`` CSR, BSR or COO matrix.

    The mask marks every *stored* entry (explicit zeros included), so the structure round-trips.
    """
    if t.layout == torch.sparse_csr:
        crow, col = t.crow_indices(), t.col_indices()
        counts = (crow[1:] - crow[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(t.shape[0], device=t.device), counts)
        mask = torch.zeros(t.shape, dtype=torch.bool, device=t.device)
        mask[rows, col.long()] = True
        return t.to_dense(), mask
    if t.layout == torch.sparse_bsr:
        crow, col = t.crow_indices(), t.col_indices()
        bo, bk = t.values().shape[-2:]
        rb, cb = t.shape[0] // bo, t.shape[1] // bk
        counts = (crow[1:] - crow[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(rb, device=t.device), counts)
        bmask = torch.zeros(rb, cb, dtype=torch.bool, device=t.device)
        bmask[rows, col.long()] = True
        return t.to_dense(), expand_block_mask(bmask, (bo, bk), tuple(t.shape))
    if t.layout == torch.sparse_coo:
        t = t.coalesce()
        mask = torch.zeros(t.shape, dtype=torch.bool, device=t.device)
        mask[tuple(t.indices())] = True
        return t.to_dense(), mask
    raise TypeError(f"t: expected a torch.sparse CSR, BSR or COO tensor, got layout {t.layout}")
