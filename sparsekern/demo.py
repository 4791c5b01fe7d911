"""Demo: sparsify a small CNN, train it on scikit-learn's bundled digits, report what ran.

``python -m sparsekern.demo [--sparsity 0.9] [--layout unstructured|block] [--steps 300]``

The data is the real 8x8 handwritten-digits set that ships inside scikit-learn (1,797 images),
so nothing is downloaded.  The first conv and the classifier stay dense.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import sparsekern
from sparsekern.convert import SparsityConfig, skip_first_and_last, sparse_modules, sparsify_


def load_digits_tensors(seed: int = 0):
    """(x_train, y_train, x_test, y_test) from sklearn's digits, a seeded 80/20 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - the README's set-up installs it
        raise SystemExit("the demo needs scikit-learn (pip install 'sparsekern[cl]')") from exc
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 2 * 2, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--layout", choices=["unstructured", "block"], default="unstructured")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    xtr, ytr, xte, yte = load_digits_tensors(args.seed)
    model = make_model()
    cfg = SparsityConfig(
        sparsity=args.sparsity,
        layout=args.layout,
        block_size=args.block_size if args.layout == "block" else None,
    )
    sparsify_(model, cfg, filter_fn=skip_first_and_last(model))
    print(f"sparsekern {sparsekern.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"digits: {len(ytr)} train / {len(yte)} test images; sparsity {args.sparsity} {args.layout}")
    for name, m in sparse_modules(model):
        print(
            f"  {name:3s} {type(m).__name__:13s} {tuple(m.weight.shape)!s:18s} density {m.density():.3f} "
            f"backend {m.selected_backend()}"
        )
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    first_loss = last_loss = None
    model.train()
    for _ in range(args.steps):
        idx = torch.randint(0, len(ytr), (args.batch_size,), generator=g)
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first_loss = loss.item() if first_loss is None else first_loss
        last_loss = loss.item()
    elapsed = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    dens = {n: m.density() for n, m in sparse_modules(model)}
    print(
        f"trained {args.steps} steps in {elapsed:.1f}s: loss {first_loss:.3f} -> {last_loss:.3f}, "
        f"test accuracy {acc:.3f}"
    )
    print(
        "densities after training (unchanged by the optimizer): " + ", ".join(f"{n}={d:.3f}" for n, d in dens.items())
    )
    return {"accuracy": acc, "first_loss": first_loss, "last_loss": last_loss, "densities": dens, "seconds": elapsed}


if __name__ == "__main__":
    main()
