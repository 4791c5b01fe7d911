"""Logs written while a run goes: ``output_dir/log.csv`` (one row per epoch and per task end, flushed
each row, so a batch job is never silent until it ends) and, with ``tensorboard: true``, TensorBoard
scalars in ``output_dir/tensorboard`` when ``torch.utils.tensorboard`` can be imported."""

from __future__ import annotations

import csv
import os
import sys
import time

__all__ = ["RunLog", "LOG_COLUMNS"]

LOG_COLUMNS = ("event", "task", "epoch", "loss", "avg_class_il", "avg_task_il", "epoch_train_s", "elapsed_s")


class RunLog:
    """The run's log: ``log.csv`` rows and TensorBoard scalars (nothing at all without ``out_dir``).

    Rows: ``event`` (``epoch``, ``task_end`` or ``diverged``), ``task``, ``epoch`` (1-based, epochs
    done in the task), ``loss`` (the last training batch's loss), ``avg_class_il`` / ``avg_task_il``
    (the average accuracy over the tasks trained so far, at the latest task end; empty before the
    first), ``epoch_train_s`` (the epoch's timed training) and ``elapsed_s`` (wall-clock since the
    log was opened).  ``append``: continue an existing ``log.csv`` (a resumed run).
    """

    def __init__(self, out_dir: str | None, *, append: bool = False, tensorboard: bool = False) -> None:
        self.t0 = time.perf_counter()
        self.acc: dict[str, float] = {}
        self.file = self.writer = self.tb = None
        if not out_dir:
            return
        path = os.path.join(out_dir, "log.csv")
        fresh = not (append and os.path.isfile(path))
        self.file = open(path, "w" if fresh else "a", newline="")  # noqa: SIM115 - open for the whole run
        self.writer = csv.writer(self.file)
        if fresh:
            self._write(LOG_COLUMNS)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print(
                    "note: tensorboard: true, but torch.utils.tensorboard cannot be imported (pip install tensorboard); "
                    f"writing only {path}",
                    file=sys.stderr,
                )
            else:
                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def _write(self, row) -> None:
        self.writer.writerow(row)
        self.file.flush()

    def _row(self, event: str, task: int, epoch: int, loss, train_s=None) -> None:
        if self.writer is None:
            return
        acc = [f"{self.acc[s]:.4f}" if s in self.acc else "" for s in ("class_il", "task_il")]
        self._write(
            [event, task, epoch, "" if loss is None else f"{loss:.6g}", *acc]
            + ["" if train_s is None else f"{train_s:.4f}", f"{time.perf_counter() - self.t0:.3f}"]
        )

    def epoch(self, task: int, epoch: int, loss: float, train_s: float, step: int) -> None:
        """An epoch ended (``epoch`` epochs of ``task`` done; ``step``: epochs done in the run)."""
        self._row("epoch", task, epoch, loss, train_s)
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/epoch_time_s", train_s, step)

    def task_end(self, task: int, epoch: int, rows: dict[str, list[list[float]]]) -> None:
        """Task ``task`` ended; ``rows``: the accuracy matrix so far (``{setting: [row per task]}``)."""
        for s, r in rows.items():
            self.acc[s] = sum(r[-1][: task + 1]) / (task + 1)
        self._row("task_end", task, epoch, None)
        if self.tb is not None:
            for s, v in self.acc.items():
                self.tb.add_scalar(f"avg_acc/{s}", v, task)

    def diverged(self, task: int, epoch: int, loss: float) -> None:
        """The run stopped in ``epoch`` (1-based) of ``task`` on a non-finite loss or weight."""
        self._row("diverged", task, epoch, loss)

    def close(self) -> None:
        """Flush and close the files (the CSV is already complete up to the last row)."""
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()
