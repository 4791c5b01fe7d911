"""Reservoir replay buffer: inputs, labels, logits and task ids, deterministic under a seed."""

from __future__ import annotations

import torch

__all__ = ["ReservoirBuffer"]


class ReservoirBuffer:
    """A fixed-size sample of every example offered so far, each kept with probability ``size / seen``.

    Stores the raw (un-augmented) input, the label, the logits seen when the example was inserted
    (for DER/DER++) and its task id.  All randomness comes from the buffer's own generator, so two
    buffers with the same seed offered the same stream hold the same examples.

    Args:
        size: capacity (number of examples); ``0`` gives an always-empty buffer.
        seed: seed of the buffer's generator.

    Example:
        >>> buf = ReservoirBuffer(200, seed=0)
        >>> buf.add(x, y, logits=out.detach(), task=0)
        >>> xb, yb, lb, tb = buf.sample(32)
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"buffer_size: expected a non-negative integer, got {size!r}")
        self.size = size
        self.seen = 0
        self.generator = torch.Generator().manual_seed(int(seed))
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.task: torch.Tensor | None = None

    def __len__(self) -> int:
        return min(self.seen, self.size)

    def is_empty(self) -> bool:
        return len(self) == 0

    def _allocate(self, x: torch.Tensor, logits: torch.Tensor | None) -> None:
        self.x = torch.zeros((self.size, *x.shape[1:]), dtype=x.dtype)
        self.y = torch.zeros(self.size, dtype=torch.long)
        self.task = torch.zeros(self.size, dtype=torch.long)
        if logits is not None:
            self.logits = torch.zeros((self.size, *logits.shape[1:]), dtype=logits.dtype)

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None, task: int | torch.Tensor = 0):
        """Offer a batch; each example replaces a random slot once the buffer is full (reservoir)."""
        if self.size == 0:
            self.seen += int(x.shape[0])
            return
        x, y = x.detach().cpu(), y.detach().cpu()
        logits = logits.detach().cpu() if logits is not None else None
        if self.x is None:
            self._allocate(x, logits)
        tasks = task if isinstance(task, torch.Tensor) else torch.full((x.shape[0],), int(task), dtype=torch.long)
        for i in range(x.shape[0]):
            if self.seen < self.size:
                slot = self.seen
            else:
                r = int(torch.randint(0, self.seen + 1, (1,), generator=self.generator))
                slot = r if r < self.size else -1
            self.seen += 1
            if slot >= 0:
                self.x[slot] = x[i]
                self.y[slot] = y[i]
                self.task[slot] = tasks[i]
                if logits is not None and self.logits is not None:
                    self.logits[slot] = logits[i]

    def sample(self, n: int):
        """``n`` stored examples drawn without replacement (all of them if fewer): ``(x, y, logits, task)``."""
        k = len(self)
        if k == 0:
            raise RuntimeError("sample: the buffer is empty")
        idx = torch.randperm(k, generator=self.generator)[: min(n, k)]
        logits = self.logits[idx] if self.logits is not None else None
        return self.x[idx], self.y[idx], logits, self.task[idx]

    def state_dict(self) -> dict:
        return {
            "size": self.size,
            "seen": self.seen,
            "generator": self.generator.get_state(),
            "x": self.x,
            "y": self.y,
            "logits": self.logits,
            "task": self.task,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size:
            raise ValueError(f"buffer: checkpoint holds a buffer of size {state['size']}, this run has {self.size}")
        self.seen = state["seen"]
        self.generator.set_state(state["generator"])
        self.x, self.y, self.logits, self.task = state["x"], state["y"], state["logits"], state["task"]
