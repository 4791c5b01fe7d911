"""Providers: how each (op, provider, mode) case turns into a callable to time.

``dense``        plain PyTorch with a dense weight (``F.linear``, ``F.conv2d``, ``a @ b``);
``torch.sparse`` the weight as a ``torch.sparse`` CSR (unstructured) or BSR (block) tensor;
``reference`` / ``cpp`` / ``triton`` / ``cuda``: the sparsekern backend of that name (``backend=``).

:func:`availability` says, at run time, whether a provider can run on a device at all;
:func:`prepare` builds the inputs (outside the timed region) and returns the callable, or raises
:class:`Skip` with the reason a provider cannot run that particular case.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import sparsekern
from sparsekern import formats, masks

from .cases import SPARSEKERN_PROVIDERS, Case, ConvShape, LinearShape, ModelShape, block_of
from .models import build_model

__all__ = ["Skip", "Prepared", "availability", "prepare"]


class Skip(Exception):
    """A provider cannot run a case; the message is the reason recorded in the results."""


@dataclass
class Prepared:
    """A case ready to time: ``fn()`` is the timed call."""

    fn: Callable[[], object]
    flops: float | None  # useful FLOPs of one call, counted on the weight's nonzeros
    density: float  # measured density of the weight mask (1.0 for dense)
    unit: str = "s/call"


_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def availability(provider: str, device: str) -> tuple[bool, str]:
    """Whether ``provider`` can run on ``device`` here, and the reason if not (checked at run time)."""
    if device == "cuda" and not torch.cuda.is_available():
        return False, "no CUDA device"
    if provider == "dense":
        return True, ""
    if provider == "torch.sparse":
        return True, ""
    if provider == "formats":
        return True, ""
    if provider in ("triton", "cuda") and device != "cuda":
        return False, f"the {provider} backend runs on CUDA tensors; this run is on {device}"
    if provider == "cpp" and device != "cpu":
        return False, "the cpp backend runs on CPU tensors"
    try:
        ok, why = sparsekern.get_backend(provider).available()
    except Exception as exc:  # a backend that fails to import is reported, not fatal
        return False, f"could not load: {exc}"
    return ok, why


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------


def _mask(shape, sparsity: float, layout: str, device, gen: torch.Generator) -> torch.Tensor:
    if layout == "dense" or sparsity == 0.0 and layout == "unstructured":
        return torch.ones(shape, dtype=torch.bool, device=device)
    b = block_of(layout)
    m = masks.random_mask(shape, sparsity, layout="block" if b else "unstructured", block_size=b, generator=gen)
    return m.to(device)


def _sk_kwargs(case: Case) -> dict:
    b = block_of(case.layout)
    return {"backend": case.provider, "layout": "block" if b else "unstructured", "block_size": b}


def _pass_factor(mode: str) -> int:
    # forward: one product; backward: input gradient + weight gradient; both: three
    return {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]


def _wrap_mode(mode: str, f: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], object]:
    """Turn a forward closure into the timed callable for ``mode``."""
    if mode == "fwd":

        def run_fwd():
            with torch.no_grad():
                return f()

        return run_fwd
    y = f()
    if not y.requires_grad:
        raise Skip("the output does not require grad (no backward to time)")
    dy = torch.randn_like(y) if not y.is_sparse_csr else torch.ones_like(y)
    if mode == "bwd":
        return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)
    return lambda: torch.autograd.grad(f(), leaves, dy)


def _try(fn: Callable[[], object], case: Case) -> None:
    """One call outside the timed region: builds cached metadata, and turns a failure into a Skip."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except Skip:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Skip(f"{case.provider} cannot run this case: {type(exc).__name__}: {msg[:200]}") from exc


def _torch_sparse_weight(w: torch.Tensor, mask: torch.Tensor, layout: str) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        b = block_of(layout)
        if b is None:
            ws = formats.to_torch_sparse_csr(w.detach(), mask)
        else:
            try:
                ws = formats.to_torch_sparse_bsr(w.detach(), mask, b)
            except ValueError as exc:
                raise Skip(f"torch.sparse BSR: {exc}") from exc
    return ws.requires_grad_(w.requires_grad)


def _prepare_linear(case: Case, gen: torch.Generator) -> Prepared:
    shape: LinearShape = case.shape
    dev, dt = torch.device(case.device), torch_dtype(case.dtype)
    n, k, m = case.batch, shape.in_features, shape.out_features
    grad = case.mode != "fwd"
    x = torch.randn(n, k, generator=gen).to(dev, dt).requires_grad_(grad)
    w = (torch.randn(m, k, generator=gen) / math.sqrt(k)).to(dev, dt).requires_grad_(grad)
    bias = torch.zeros(m, device=dev, dtype=dt).requires_grad_(grad) if case.op == "linear" else None
    mask = _mask((m, k), case.sparsity, case.layout, dev, gen)
    nnz = int(mask.sum())
    leaves = [t for t in (x, w, bias) if t is not None]
    if case.provider == "dense":
        f = lambda: F.linear(x, w, bias)  # noqa: E731
    elif case.provider == "torch.sparse":
        ws = _torch_sparse_weight(w, mask, case.layout)
        leaves = [x, ws] + ([bias] if bias is not None else [])

        def f():
            y = torch.sparse.mm(ws, x.t()).t()
            return y + bias if bias is not None else y
    elif case.op == "spmm":
        kw = _sk_kwargs(case)
        f = lambda: sparsekern.spmm(x, w, mask, **kw)  # noqa: E731
    else:
        kw = _sk_kwargs(case)
        f = lambda: sparsekern.sparse_linear(x, w, bias, mask, **kw)  # noqa: E731
    _try(f, case)
    fn = _wrap_mode(case.mode, f, leaves)
    _try(fn, case)
    return Prepared(fn, 2.0 * n * nnz * _pass_factor(case.mode), nnz / mask.numel())


def _prepare_sddmm(case: Case, gen: torch.Generator) -> Prepared:
    # the weight gradient of a linear layer: (dyᵀ[M, N] @ x[N, K]) ⊙ mask[M, K]
    shape: LinearShape = case.shape
    dev, dt = torch.device(case.device), torch_dtype(case.dtype)
    n, k, m = case.batch, shape.in_features, shape.out_features
    grad = case.mode != "fwd"
    a = torch.randn(m, n, generator=gen).to(dev, dt).requires_grad_(grad)
    b = torch.randn(n, k, generator=gen).to(dev, dt).requires_grad_(grad)
    mask = _mask((m, k), case.sparsity, case.layout, dev, gen)
    nnz = int(mask.sum())
    if case.provider == "dense":
        f = lambda: a @ b  # noqa: E731
    elif case.provider == "torch.sparse":
        if block_of(case.layout) is not None:
            raise Skip("torch.sparse.sampled_addmm takes a CSR pattern only (no BSR)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pat = formats.to_torch_sparse_csr(torch.zeros(m, k, device=dev, dtype=dt), mask)
        f = lambda: torch.sparse.sampled_addmm(pat, a, b, beta=0.0)  # noqa: E731
    else:
        kw = _sk_kwargs(case)
        f = lambda: sparsekern.sddmm(a, b, mask, **kw)  # noqa: E731
    _try(f, case)
    fn = _wrap_mode(case.mode, f, [a, b])
    _try(fn, case)
    return Prepared(fn, 2.0 * n * nnz * _pass_factor(case.mode), nnz / mask.numel())


def _prepare_conv(case: Case, gen: torch.Generator) -> Prepared:
    shape: ConvShape = case.shape
    dev, dt = torch.device(case.device), torch_dtype(case.dtype)
    if case.provider == "torch.sparse":
        raise Skip("torch.sparse has no conv2d")
    grad = case.mode != "fwd"
    x = torch.randn(case.batch, shape.cin, shape.hw, shape.hw, generator=gen).to(dev, dt).requires_grad_(grad)
    fan_in = shape.cin * shape.kernel**2
    w = (torch.randn(*shape.weight_shape, generator=gen) / math.sqrt(fan_in)).to(dev, dt).requires_grad_(grad)
    mask = _mask(shape.weight_shape, case.sparsity, case.layout, dev, gen)
    nnz = int(mask.sum())
    s, p = shape.stride, shape.padding
    if case.provider == "dense":
        f = lambda: F.conv2d(x, w, None, s, p)  # noqa: E731
    else:
        kw = _sk_kwargs(case)
        f = lambda: sparsekern.sparse_conv2d(x, w, None, mask, None, s, p, **kw)  # noqa: E731
    _try(f, case)
    fn = _wrap_mode(case.mode, f, [x, w])
    _try(fn, case)
    return Prepared(fn, 2.0 * shape.positions(case.batch) * nnz * _pass_factor(case.mode), nnz / mask.numel())


def _prepare_rebuild(case: Case, gen: torch.Generator) -> Prepared:
    """A mask change as a user pays it: ``set_mask`` on the layer plus all the index metadata its
    next forward and backward read (automatic backend), alternating between two masks so that
    every call is a real change.  Returns the weight pattern's metadata."""
    shape = case.shape
    dev, dt = torch.device(case.device), torch_dtype(case.dtype)
    masks = [_mask(shape.weight_shape, case.sparsity, case.layout, dev, gen) for _ in range(2)]
    b = block_of(case.layout)
    kw = {"layout": "block" if b else "unstructured", "block_size": b, "bias": False, "device": dev, "dtype": dt}
    if isinstance(shape, ConvShape):
        layer = sparsekern.SparseConv2d(shape.cin, shape.cout, shape.kernel, shape.stride, shape.padding, **kw)
    else:
        layer = sparsekern.SparseLinear(shape.in_features, shape.out_features, **kw)
    turn = [0]

    def fn():
        turn[0] ^= 1
        layer.set_mask(masks[turn[0]])
        layer._prepare_metadata(case.batch)
        pattern = layer._call_info()[1]
        return pattern.bsr() if b else pattern.csr()

    _try(fn, case)
    return Prepared(fn, None, int(masks[0].sum()) / masks[0].numel())


def _prepare_train(case: Case, gen: torch.Generator) -> Prepared:
    shape: ModelShape = case.shape
    dev, dt = torch.device(case.device), torch_dtype(case.dtype)
    torch.manual_seed(0)
    model, in_shape, keep = build_model(shape.model, shape.width)
    if case.provider != "dense":
        if case.provider == "torch.sparse":
            raise Skip("torch.sparse has no training modules (sparsify_ targets sparsekern backends)")
        b = block_of(case.layout)
        cfg = sparsekern.SparsityConfig(
            sparsity=case.sparsity,
            layout="block" if b else "unstructured",
            block_size=b,
            backend=case.provider,
            keep_dense=tuple(sorted(keep)),
        )
        sparsekern.sparsify_(model, cfg)
    model = model.to(dev, dt).train()
    steps = 1 if case.op == "train_step" else shape.steps_per_epoch
    xs = [torch.randn(case.batch, *in_shape, generator=gen).to(dev, dt) for _ in range(steps)]
    ys = [torch.randint(0, 10, (case.batch,), generator=gen).to(dev) for _ in range(steps)]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def epoch():
        for x, y in zip(xs, ys):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

    _try(epoch, case)
    flops, density = _model_flops(model, xs[0])
    return Prepared(epoch, flops * steps, density)


def _model_flops(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Training FLOPs of one step on the weights' nonzeros (3× the forward's), and the overall density."""
    counts: list[tuple[int, int, int]] = []  # (positions, nnz, numel)

    def hook(mod, inp, out):
        mask = getattr(mod, "weight_mask", None)
        nnz = int(mask.sum()) if mask is not None else mod.weight.numel()
        positions = out.numel() // out.shape[1] if out.dim() == 4 else out.numel() // out.shape[-1]
        counts.append((positions, nnz, mod.weight.numel()))

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    flops = sum(6.0 * p * n for p, n, _ in counts)
    numel = sum(t for _, _, t in counts)
    return flops, (sum(n for _, n, _ in counts) / numel if numel else 1.0)


_PREPARE = {
    "spmm": _prepare_linear,
    "linear": _prepare_linear,
    "sddmm": _prepare_sddmm,
    "conv2d": _prepare_conv,
    "rebuild": _prepare_rebuild,
    "train_step": _prepare_train,
    "train_epoch": _prepare_train,
}


def prepare(case: Case, seed: int = 0) -> Prepared:
    """Build ``case``'s inputs and callable (raises :class:`Skip` when the provider cannot run it)."""
    ok, why = availability(case.provider, case.device)
    if not ok:
        raise Skip(why)
    if case.provider in SPARSEKERN_PROVIDERS and case.layout == "dense":
        raise Skip("a sparsekern provider needs a sparse layout")
    gen = torch.Generator().manual_seed(seed)
    return _PREPARE[case.op](case, gen)
