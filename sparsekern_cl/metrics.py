"""Continual-learning metrics on an accuracy matrix.

``R[i][j]`` is the accuracy on task ``j``'s evaluation data after training on tasks ``0..i``
(``T`` rows, ``T`` columns, entries in percent or fractions, the same unit everywhere).  ``b[j]``
is the accuracy of the randomly initialised model on task ``j`` (GEM's reference for FWT).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "average_accuracy",
    "backward_transfer",
    "forward_transfer",
    "forgetting",
    "summarize",
    "average_accuracy_curve",
]


def _check(R: Sequence[Sequence[float]]) -> int:
    T = len(R)
    if T == 0 or any(len(row) != T for row in R):
        raise ValueError(f"R: expected a square T x T accuracy matrix, got {[len(r) for r in R]} columns per row")
    return T


def average_accuracy(R) -> float:
    """Mean accuracy over all tasks after the last task: ``mean_j R[T-1][j]``."""
    T = _check(R)
    return sum(R[T - 1]) / T


def average_accuracy_curve(R) -> list[float]:
    """After each task ``i``, the mean accuracy over the tasks seen so far: ``mean_{j<=i} R[i][j]``."""
    T = _check(R)
    return [sum(R[i][: i + 1]) / (i + 1) for i in range(T)]


def backward_transfer(R) -> float:
    """BWT = ``1/(T-1) * sum_{j<T-1} (R[T-1][j] - R[j][j])`` (negative: forgetting); 0 for one task."""
    T = _check(R)
    if T == 1:
        return 0.0
    return sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)


def forward_transfer(R, b: Sequence[float]) -> float:
    """FWT = ``1/(T-1) * sum_{j>=1} (R[j-1][j] - b[j])``, ``b`` the random-init accuracies; 0 for one task."""
    T = _check(R)
    if len(b) != T:
        raise ValueError(f"b: expected {T} reference accuracies, got {len(b)}")
    if T == 1:
        return 0.0
    return sum(R[j - 1][j] - b[j] for j in range(1, T)) / (T - 1)


def forgetting(R) -> float:
    """Average forgetting: ``mean_{j<T-1} (max_{l<T-1} R[l][j] - R[T-1][j])``; 0 for one task."""
    T = _check(R)
    if T == 1:
        return 0.0
    return sum(max(R[i][j] for i in range(j, T - 1)) - R[T - 1][j] for j in range(T - 1)) / (T - 1)


def summarize(R, b: Sequence[float]) -> dict:
    """All metrics of one setting as a dict."""
    out = {
        "avg_acc": average_accuracy(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R, b),
        "forgetting": forgetting(R),
        "avg_acc_curve": average_accuracy_curve(R),
    }
    for k, v in out.items():
        if isinstance(v, float) and math.isnan(v):
            raise ValueError(f"{k}: NaN from the accuracy matrix {R}")
    return out
