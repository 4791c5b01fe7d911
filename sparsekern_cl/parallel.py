"""Data-parallel runs: ``python -m sparsekern_cl`` under ``torchrun``.

Under ``torchrun --nproc_per_node N`` (or in a process that has initialised ``torch.distributed``
itself) a run trains data-parallel.  ``batch_size`` stays the *global* batch: each rank runs the
strategy's training forwards on its contiguous shard of the rows (the current batch, the replay
samples), and the outputs are gathered so that every rank computes the same loss on the whole
batch.  The backward of the gather keeps each rank's own rows, and one all-reduce after each
backward (``sparsekern.distributed.allreduce_grads``: sparse weights send only their values on
``G``) sums the gradients, which are then those of one process on the global batch up to the
order of the floating-point sums.  A batch with fewer rows than ranks runs whole on every rank.

**Everything else is decided identically from identical inputs**, not decided on one rank and
broadcast: every rank holds the whole dataset, visits the same epoch order, augments the whole
batch with the same generator, draws the same replay samples, inserts the whole batch (with the
gathered logits) into its replay buffer, and makes the same mask decisions (SparCL, DST,
EsaCL) from the same, all-reduced, gradients and weights.  Passes a method makes outside the
training step (importance scores, SAM's first pass, the Fisher) run whole on every rank.  The
runner checks that at every epoch and task end: the ranks compare a digest of the model (weights
and masks), the strategy's state (optimizer, replay buffer, generators, method state) and the
torch RNG, and a mismatch stops the run naming what differs.

Only rank 0 writes (log, checkpoints, results, plots); every rank reads the checkpoint to resume.
Batch norm normalises with each rank's shard statistics (as DDP without ``SyncBatchNorm``) and its
running statistics would differ between ranks, which the check reports: use a backbone without
batch norm or dropout (the MLP) for results equal to one process.
"""

from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist

__all__ = ["DataParallel", "setup", "digest"]


class _GatherRows(torch.autograd.Function):
    """All-gather each rank's rows into the whole batch; the backward keeps this rank's rows."""

    @staticmethod
    def forward(ctx, local, sizes, rank, group):
        ctx.lo = sum(sizes[:rank])
        ctx.n = sizes[rank]
        width = max(sizes)
        pad = local.new_zeros((width, *local.shape[1:]))
        pad[: local.shape[0]] = local
        parts = [torch.empty_like(pad) for _ in sizes]
        dist.all_gather(parts, pad.contiguous(), group=group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.lo : ctx.lo + ctx.n], None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward divides by ``k``: a pass every rank runs whole, summed ``k`` times."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.k, None


class DataParallel:
    """The ranks of a data-parallel run and what a strategy asks of them.

    Attributes:
        rank, world_size: this process and the number of processes; group: the process group.
        owns_group: the runner initialised the group (and destroys it at the end).
        checks: digest comparisons passed so far.
    """

    def __init__(self, group=None, owns_group: bool = False) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.owns_group = owns_group
        self.checks = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard_sizes(self, n: int) -> list[int]:
        """Rows of each rank for a batch of ``n`` (contiguous, sizes differ by at most one)."""
        return [n // self.world_size + (1 if r < n % self.world_size else 0) for r in range(self.world_size)]

    def forward(self, model, x: torch.Tensor, counter=None) -> torch.Tensor:
        """``model(x)`` of the whole batch, computed on this rank's rows and gathered.

        ``counter``: the run's :class:`~sparsekern_cl.flops.FlopCounter`, which counts the shard
        scaled to the whole batch (each rank reports one process's FLOPs).
        """
        n = x.shape[0]
        if n < self.world_size:
            return _ScaleGrad.apply(model(x), float(self.world_size))
        sizes = self.shard_sizes(n)
        lo = sum(sizes[: self.rank])
        local_x = x[lo : lo + sizes[self.rank]]
        if counter is not None:
            counter.row_scale = n / local_x.shape[0]
        try:
            local = model(local_x)
        finally:
            if counter is not None:
                counter.row_scale = 1.0
        return _GatherRows.apply(local, sizes, self.rank, self.group)

    def sync_grads(self, model) -> int:
        """Sum every parameter's gradient over the ranks (sparse weights on ``G`` only)."""
        from sparsekern.distributed import allreduce_grads

        return allreduce_grads(model, self.group, average=False)

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` over the ranks, in place (one collective)."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.group)
        off = 0
        for t in tensors:
            t.copy_(flat[off : off + t.numel()].view_as(t))
            off += t.numel()

    def check_consistent(self, where: str, parts: dict) -> None:
        """Raise ``RuntimeError`` unless every rank has the same :func:`digest` of each of ``parts``."""
        mine = {k: digest(v) for k, v in parts.items()}
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, mine, group=self.group)
        differ = sorted(k for k in mine if any(g[k] != gathered[0][k] for g in gathered))
        if differ:
            raise RuntimeError(
                f"data-parallel: the ranks' {', '.join(differ)} differ at {where} "
                "(a batch-norm or dropout backbone, or a method that reads rank-local state?)"
            )
        self.checks += 1

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def digest(obj) -> str:
    """A content hash of nested dicts / lists / tuples of tensors and plain values."""
    h = hashlib.sha1()

    def feed(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            h.update(b"{")
            for k in sorted(o, key=repr):
                feed(k)
                feed(o[k])
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for v in o:
                feed(v)
            h.update(b"]")
        else:
            h.update(repr(o).encode())

    feed(obj)
    return h.hexdigest()


def setup(device: str) -> DataParallel | None:
    """The run's :class:`DataParallel`, or ``None`` for one process.

    A process group initialised by the caller is used as it is; under ``torchrun``
    (``WORLD_SIZE`` > 1 in the environment) one is initialised here: gloo for a CPU ``device``,
    NCCL for CUDA (each rank on GPU ``LOCAL_RANK``).
    """
    if not dist.is_available():
        return None
    if dist.is_initialized():
        return DataParallel() if dist.get_world_size() > 1 else None
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return DataParallel(owns_group=True)
