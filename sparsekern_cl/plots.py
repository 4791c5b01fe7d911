"""Plots of a run: the accuracy matrices as heatmaps and the accuracy of each task over time."""

from __future__ import annotations

import os

__all__ = ["write_plots"]


def write_plots(results: dict, out_dir: str) -> list[str]:
    """Write ``acc_matrix.png`` and ``acc_over_time.png`` into ``out_dir``; returns the paths.

    Returns an empty list (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    settings = [s for s in ("class_il", "task_il") if results["acc_matrix"].get(s)]
    paths = []
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4.2), squeeze=False)
    for ax, s in zip(axes[0], settings):
        R = results["acc_matrix"][s]
        im = ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
        for i, row in enumerate(R):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="w" if v < 60 else "k", fontsize=8)
        ax.set_xlabel("evaluated task j")
        ax.set_ylabel("after training task i")
        ax.set_title(f"{s.replace('_', '-').upper()} accuracy R[i][j] (%)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(_title(results))
    fig.tight_layout()
    p = os.path.join(out_dir, "acc_matrix.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4.2), squeeze=False)
    for ax, s in zip(axes[0], settings):
        R = results["acc_matrix"][s]
        T = len(R)
        for j in range(T):
            rows = list(range(j, len(R)))
            ax.plot(rows, [R[i][j] for i in rows], marker="o", label=f"task {j}")
        curve = results["avg_acc_curve"][s]
        ax.plot(range(len(curve)), curve, "k--", lw=2, label="mean of seen")
        ax.set_xlabel("after training task")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(s.replace("_", "-").upper())
        ax.legend(fontsize=7)
    fig.suptitle(_title(results))
    fig.tight_layout()
    p = os.path.join(out_dir, "acc_over_time.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def _title(results: dict) -> str:
    c = results["config"]
    return f"{c['method']} on {c['dataset']}, sparsity {c['sparsity']:g}, seed {c['seed']}"
