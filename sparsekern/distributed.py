"""Sparse layers under ``torch.distributed``: mask broadcast, DDP's buffer sync, gradients on G.

Three things go wrong, or cost more than they need to, when a model with sparse layers is
trained data-parallel, and this module has one answer for each:

* **Masks decided on one rank.**  :func:`broadcast_masks` sends every sparse layer's
  ``weight_mask`` and ``grad_mask`` from ``src`` (one collective) and writes them with the
  layers' ``set_mask``, so each rank's cached index metadata describes the new masks.
* **DDP's buffer sync.**  ``DistributedDataParallel`` (``broadcast_buffers`` /
  ``forward_sync_buffers``, on by default) copies rank 0's buffers into every rank at the start
  of each forward *and restores the buffers' version counters afterwards*
  (``torch.autograd._unsafe_preserve_version_counter``), so a rank whose mask it overwrote keeps
  the metadata of its old mask: it computes with a stale pattern and its weights drift.  (The
  broadcast in DDP's constructor does bump the counters; only the per-forward sync hides its
  write.)  :func:`track_buffer_sync` fixes this for one DDP model: before each synced forward,
  rank 0 tells the others which masks it wrote since the last forward, and every rank whose
  mask may differ from rank 0's bumps its version counter, so the forward rebuilds the metadata
  from the synced mask.  It costs one small broadcast per forward, no pass over the masks.
* **Traffic.**  A sparse layer's weight gradient is zero outside ``G``, yet DDP all-reduces it
  densely.  :func:`register_sparse_grad_hook` installs a communication hook that sends only the
  values on ``G`` (dense parameters as they are): ``1/(1-s)`` less traffic for a layer whose
  gradient mask has sparsity ``s``.  :func:`allreduce_grads` does the same for a model's
  gradients outside DDP (one collective per call).

Every rank must hold the same masks when gradients are reduced (the packed lengths follow from
``G``): with DDP's buffer sync and :func:`track_buffer_sync` they do.  Collectives run on the
masks' device, so the same code runs on gloo (CPU) and NCCL (CUDA).

Example::

    model = DistributedDataParallel(model)
    sparsekern.distributed.track_buffer_sync(model)
    state = sparsekern.distributed.register_sparse_grad_hook(model)
    ...  # train
    print(state.traffic_ratio)  # dense elements / elements sent
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .convert import sparse_modules
from .formats import invalidate, meta_cache

__all__ = [
    "broadcast_masks",
    "track_buffer_sync",
    "SparseGradState",
    "sparse_allreduce_hook",
    "register_sparse_grad_hook",
    "allreduce_grads",
]


def _module_of(model: nn.Module) -> nn.Module:
    """The wrapped module of a DDP model, else ``model``."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _flat_index(grad_mask: torch.Tensor) -> torch.Tensor:
    """Flat positions of ``grad_mask``'s True entries, cached with the mask's metadata."""
    return meta_cache(grad_mask).get(("dist.flat_index",), lambda: grad_mask.reshape(-1).nonzero().squeeze(1))


# ----------------------------------------------------------------------------- masks
@torch.no_grad()
def broadcast_masks(model: nn.Module, src: int = 0, group=None, *, zero_pruned: bool = False) -> int:
    """Give every rank ``src``'s ``weight_mask`` and ``grad_mask`` of each sparse layer.

    One broadcast of all masks (as bytes, on their device); a rank whose masks differ from
    ``src``'s writes them with ``set_mask``, which rebuilds its cached metadata.  Every rank of
    ``group`` must call it, with models of the same architecture.

    Args:
        model: a model (or a ``DistributedDataParallel`` wrapping one) with sparse layers.
        src: the rank whose masks win.
        group: the process group (``None``: the default group).
        zero_pruned: also zero the weights outside the new mask (``set_mask``'s flag); leave it
            ``False`` when the weights are synced separately.

    Returns:
        The number of sparse layers whose masks changed on this rank.
    """
    layers = [m for _, m in sparse_modules(_module_of(model))]
    masks = [t for m in layers for t in (m.weight_mask, m.grad_mask)]
    if not masks:
        return 0
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in masks])
    dist.broadcast(flat, src, group=group)
    changed = 0
    off = 0
    for m in layers:
        n = m.weight_mask.numel()
        new_m = flat[off : off + n].view(torch.bool).view(m.weight_mask.shape)
        new_g = flat[off + n : off + 2 * n].view(torch.bool).view(m.grad_mask.shape)
        off += 2 * n
        if torch.equal(new_m, m.weight_mask) and torch.equal(new_g, m.grad_mask):
            continue
        m.set_mask(new_m.clone(), grad_mask=new_g.clone(), zero_pruned=zero_pruned)
        changed += 1
    return changed


class _BufferSyncTracker:
    """Forward pre-hook of a DDP model: after DDP's hidden mask writes, no stale metadata."""

    def __init__(self, ddp: nn.parallel.DistributedDataParallel) -> None:
        self.ddp = ddp
        ignore = set(getattr(ddp, "parameters_to_ignore", ()) or ())
        self.masks = [
            t
            for name, m in sparse_modules(ddp.module)
            for b, t in (("weight_mask", m.weight_mask), ("grad_mask", m.grad_mask))
            if f"{name}.{b}" not in ignore
        ]
        self.seen: list[int] | None = None  # the versions after the last synced forward
        #: forwards whose sync made this rank rebuild at least one mask's metadata
        self.rebuilds = 0

    def __call__(self, module, args) -> None:
        if not self.masks or not self.ddp.will_sync_module_buffers():
            return
        rank = dist.get_rank(self.ddp.process_group)
        versions = [t._version for t in self.masks]
        mine = [self.seen is None or v != s for v, s in zip(versions, self.seen or versions)]
        flags = torch.tensor(mine, dtype=torch.uint8, device=self.masks[0].device)
        dist.broadcast(flags, dist.get_global_rank(self.ddp.process_group, 0), group=self.ddp.process_group)
        if rank != 0:  # rank 0's buffers are the ones DDP sends: its metadata stays right
            stale = [t for t, a, b in zip(self.masks, flags.tolist(), mine) if a or b]
            if stale:
                for t in stale:
                    invalidate(t)
                # bumped before DDP's sync saves the counters, so the bump survives their restore
                torch.autograd.graph.increment_version(stale)
                self.rebuilds += 1
        self.seen = [t._version for t in self.masks]


def track_buffer_sync(ddp: nn.parallel.DistributedDataParallel):
    """Keep each rank's sparse-layer metadata right through DDP's per-forward buffer sync.

    DDP copies rank 0's buffers, masks included, into every rank before each forward and then
    restores their version counters, so without this a rank whose mask differed from rank 0's
    would keep computing with its old pattern.  Call it on every rank right after wrapping the
    model; it registers a forward pre-hook on ``ddp`` (one small broadcast per synced forward).

    Args:
        ddp: the ``DistributedDataParallel`` model (its ``process_group`` is used).

    Returns:
        The hook's handle (``handle.remove()`` undoes it); ``handle.tracker.rebuilds`` counts the
        forwards after which this rank rebuilt metadata.
    """
    if not isinstance(ddp, nn.parallel.DistributedDataParallel):
        raise TypeError(f"ddp: expected a torch.nn.parallel.DistributedDataParallel, got {type(ddp).__name__}")
    tracker = _BufferSyncTracker(ddp)
    handle = ddp.register_forward_pre_hook(tracker)
    handle.tracker = tracker
    return handle


# ----------------------------------------------------------------------------- gradients
def _grad_masks(model: nn.Module) -> dict[int, torch.Tensor]:
    """``{id(weight parameter): grad_mask}`` of every sparse layer."""
    return {id(m._stored_weight()): m.grad_mask for _, m in sparse_modules(_module_of(model))}


def _pack(grads: list[torch.Tensor], gmasks: list[torch.Tensor | None]) -> torch.Tensor:
    """One flat tensor: each dense gradient whole, each sparse layer's weight gradient on ``G``."""
    parts = [g.reshape(-1) if G is None else g.reshape(-1)[_flat_index(G)] for g, G in zip(grads, gmasks)]
    return torch.cat(parts) if parts else grads[0].new_zeros(0)


def _unpack(flat: torch.Tensor, outs: list[torch.Tensor], gmasks: list[torch.Tensor | None]) -> None:
    """Write :func:`_pack`'s layout back into ``outs`` (zero outside ``G``)."""
    off = 0
    for out, G in zip(outs, gmasks):
        if G is None:
            n = out.numel()
            out.copy_(flat[off : off + n].view_as(out))
        else:
            idx = _flat_index(G)
            n = idx.numel()
            full = flat.new_zeros(out.numel())
            full[idx] = flat[off : off + n]
            out.copy_(full.view_as(out))
        off += n


class SparseGradState:
    """State of :func:`sparse_allreduce_hook`: which parameters are sparse weights, and the traffic.

    Args:
        model: the model (or DDP model) whose sparse layers' gradient masks are read at each
            reduction (so mask changes during training are followed).
        group: the process group (``None``: the default group).

    Attributes:
        dense_elements: gradient elements a dense all-reduce would have sent (cumulative).
        sent_elements: gradient elements actually sent (cumulative).
    """

    def __init__(self, model: nn.Module, group=None) -> None:
        self.model = _module_of(model)
        self.group = group
        self.dense_elements = 0
        self.sent_elements = 0

    @property
    def traffic_ratio(self) -> float:
        """Dense elements per element sent (``1/(1-s)`` when every parameter is a weight with a
        gradient mask of sparsity ``s``; 1.0 before any reduction)."""
        return self.dense_elements / self.sent_elements if self.sent_elements else 1.0


# no annotations: DDP checks them as objects, and this module's are strings (``from __future__``)
def sparse_allreduce_hook(state, bucket):
    """DDP communication hook: averages the bucket like DDP's default all-reduce, sending each
    sparse layer's weight gradient only on its gradient mask ``G`` (zero outside it, as the
    kernels compute it).  Register it with :func:`register_sparse_grad_hook` or
    ``ddp.register_comm_hook(SparseGradState(model), sparse_allreduce_hook)``.

    Args:
        state: a :class:`SparseGradState`; bucket: the ``torch.distributed.GradBucket``.

    Returns:
        A ``torch.futures.Future`` holding the averaged bucket.
    """
    buf = bucket.buffer()
    gmasks = _grad_masks(state.model)
    params = bucket.parameters()
    views, off = [], 0
    for p in params:  # the bucket is the parameters' gradients laid end to end
        views.append(buf.narrow(0, off, p.numel()))
        off += p.numel()
    gm = [gmasks.get(id(p)) for p in params]
    flat = _pack(views, gm)
    world = dist.get_world_size(state.group)
    flat.div_(world)
    state.dense_elements += buf.numel()
    state.sent_elements += flat.numel()
    fut = dist.all_reduce(flat, group=state.group, async_op=True).get_future()

    def scatter(f):
        _unpack(f.value()[0], views, gm)
        return buf

    return fut.then(scatter)


def register_sparse_grad_hook(ddp: nn.parallel.DistributedDataParallel, group=None) -> SparseGradState:
    """Install :func:`sparse_allreduce_hook` on ``ddp`` and return its :class:`SparseGradState`
    (``group``: ``None`` uses ``ddp.process_group``)."""
    if not isinstance(ddp, nn.parallel.DistributedDataParallel):
        raise TypeError(f"ddp: expected a torch.nn.parallel.DistributedDataParallel, got {type(ddp).__name__}")
    state = SparseGradState(ddp, ddp.process_group if group is None else group)
    ddp.register_comm_hook(state, sparse_allreduce_hook)
    return state


@torch.no_grad()
def allreduce_grads(
    model: nn.Module | Iterable[torch.Tensor], group=None, *, average: bool = True, masks: nn.Module | None = None
) -> int:
    """All-reduce the ``.grad`` of parameters in one collective, sparse weights on ``G`` only.

    For data-parallel loops without DDP.  Every rank must call it with the same parameters
    having gradients.

    Args:
        model: a model, or an iterable of parameters (then ``masks`` names the model whose
            sparse layers' gradient masks apply; without it every gradient is sent whole).
        group: the process group (``None``: the default group).
        average: divide by the group's size (``False``: sum).

    Returns:
        The number of elements sent.
    """
    if isinstance(model, nn.Module):
        params, masks = list(model.parameters()), model if masks is None else masks
    else:
        params = list(model)
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0
    gmasks = _grad_masks(masks) if masks is not None else {}
    gm = [gmasks.get(id(p)) for p in with_grad]
    grads = [p.grad for p in with_grad]
    flat = _pack(grads, gm)
    dist.all_reduce(flat, group=group)
    if average:
        flat.div_(dist.get_world_size(group))
    _unpack(flat, grads, gm)
    return flat.numel()
