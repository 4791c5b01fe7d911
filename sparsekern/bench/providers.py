"""Providers: how each (op, provider, mode) case turns into a callable to time.

``dense``        plain PyTorch with a dense weight (``F.linear``, ``F.conv2d``, ``a @ b``);
``torch.sparse`` the weight as a ``torch.sparse`` CSR (unstructured) or BSR (block) tensor: the
                 forward ``W @ xᵀ``, the input gradient ``Wᵀ @ dyᵀ`` (the transposed sparse weight
                 is built outside the timed region) and the weight gradient
                 ``torch.sparse.sampled_addmm`` on the pattern (CSR on CPU, BSR on CUDA for block
                 layouts), no autograd; PyTorch has no sparse conv2d;
``reference`` / ``cpp`` / ``triton`` / ``cuda``: the sparsekern backend of that name (``backend=``);
``dense-bf16`` / ``cpp-bf16`` / ``auto-bf16``: ``dense`` / ``cpp`` / ``auto`` with the forward under
                 ``torch.autocast(device, torch.bfloat16)`` on the case's fp32 tensors (fp32 master
                 weights; the casts are part of the timed call, as in a user's step).

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
from sparsekern.kernels.cpu import conv2d_algo
from sparsekern.models import MLP, ResNet18

from .cases import (
    AUTOCAST_PROVIDERS,
    DENSE_PROVIDERS,
    SPARSEKERN_PROVIDERS,
    Case,
    ConvShape,
    LinearShape,
    ModelShape,
    base_provider,
    block_of,
)
from .goals import KERNEL_PROVIDERS

__all__ = ["Skip", "Prepared", "availability", "build_model", "prepare"]


class Skip(Exception):
    """A provider cannot run a case; the message is the reason recorded in the results."""


@dataclass
class Prepared:
    """A case ready to time: ``fn()`` is the timed call."""

    fn: Callable[[], object]
    flops: float | None  # useful FLOPs of one call, counted on the weight's nonzeros
    density: float  # measured density of the weight mask (1.0 for dense)
    unit: str = "s/call"
    conv_algo: str = ""  # cpp conv2d: the algorithm each of fwd / dx / dw runs ("direct" or "gemm")
    max_rel_err: float | None = None  # with check=True: the largest error against the reference


_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
    "tfloat32": torch.float32,  # TF32 is allowed by the runner for these cases
}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def availability(provider: str, device: str) -> tuple[bool, str]:
    """Whether ``provider`` can run on ``device`` here, and the reason if not (checked at run time)."""
    if device == "cuda" and not torch.cuda.is_available():
        return False, "no CUDA device"
    provider = base_provider(provider)
    if provider == "dense":
        return True, ""
    if provider == "torch.sparse":
        return True, ""
    if provider in ("formats", "auto"):
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
    return {"backend": base_provider(case.provider), "layout": "block" if b else "unstructured", "block_size": b}


def _amp(case: Case, f: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``f`` under bf16 autocast for an autocast provider (the backward then runs outside it, as
    ``torch.autocast`` recommends); ``f`` itself otherwise."""
    if case.provider not in AUTOCAST_PROVIDERS:
        return f

    def amp():
        with torch.autocast(case.device, dtype=torch.bfloat16):
            return f()

    return amp


def _backend_of(case: Case) -> str | None:
    """``backend=`` of a kernel op's closure: None for the dense providers (plain PyTorch)."""
    return None if case.provider in DENSE_PROVIDERS else base_provider(case.provider)


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


def _torch_sparse_step(case: Case, x, w, bias, mask) -> Callable[[], object]:
    """torch.sparse's version of the case's mode, without autograd (see the module docstring)."""
    ws = _torch_sparse_weight(w.detach(), mask, case.layout)
    if case.mode == "fwd":
        return lambda: _sparse_fwd(ws, x, bias)
    b = block_of(case.layout)
    wts = _torch_sparse_weight(w.detach().t().contiguous(), mask.t().contiguous(), case.layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zeros = torch.zeros_like(w.detach())
        # sampled_addmm has a BSR kernel on CUDA only; on CPU the block pattern goes in as CSR
        pat = (
            formats.to_torch_sparse_bsr(zeros, mask, b) if b and w.is_cuda else formats.to_torch_sparse_csr(zeros, mask)
        )
    x, bias = x.detach(), (bias.detach() if bias is not None else None)
    dy = torch.randn(x.shape[0], w.shape[0], generator=torch.Generator().manual_seed(1)).to(x)

    def bwd():
        dx = torch.mm(wts, dy.t()).t()
        dw = torch.sparse.sampled_addmm(pat, dy.t(), x, beta=0.0)
        return (dx, dw, dy.sum(0)) if bias is not None else (dx, dw)

    if case.mode == "bwd":
        return bwd
    return lambda: (_sparse_fwd(ws, x, bias), *bwd())


def _sparse_fwd(ws: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = torch.sparse.mm(ws, x.t()).t()
    return y + bias if bias is not None else y


def _outputs(
    f: Callable[[], torch.Tensor], leaves: list[torch.Tensor], mode: str, dy: torch.Tensor
) -> list[torch.Tensor]:
    y = f()
    if mode == "fwd":
        return [y]
    return ([y] if mode == "fwd+bwd" else []) + list(torch.autograd.grad(y, leaves, dy.to(y.dtype)))


def _check(case: Case, build: Callable[..., Callable[[], torch.Tensor]], leaves: list[torch.Tensor]) -> float:
    """Largest ``max|out - ref| / max|ref|`` over the mode's outputs, the reference backend in fp32.

    ``build(tensors, backend)`` makes the forward closure on ``tensors`` (the case's ``leaves``
    or their fp32 copies).
    """
    ref_leaves = [t.detach().float().requires_grad_(t.requires_grad) for t in leaves]
    ref_f = build(ref_leaves, "reference")
    with torch.no_grad():
        dy = torch.randn(ref_f().shape, generator=torch.Generator().manual_seed(2)).to(leaves[0].device)
    got = _outputs(_amp(case, build(leaves, _backend_of(case))), leaves, case.mode, dy)
    ref = _outputs(ref_f, ref_leaves, case.mode, dy)
    err = 0.0
    for g, r in zip(got, ref):
        scale = r.abs().max().item() or 1.0
        err = max(err, (g.detach().float() - r).abs().max().item() / scale)
    return err


def _prepare_linear(case: Case, gen: torch.Generator, check: bool = False) -> Prepared:
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
    flops = 2.0 * n * nnz * _pass_factor(case.mode)
    if case.provider == "torch.sparse":
        fn = _torch_sparse_step(case, x, w, bias, mask)
        _try(fn, case)
        return Prepared(fn, flops, nnz / mask.numel())

    def build(tensors, backend):
        xx, ww, bb = (*tensors, None)[:3]
        if backend is None:
            return lambda: F.linear(xx, ww, bb)
        kw = {**_sk_kwargs(case), "backend": backend}
        return lambda: sparsekern.sparse_linear(xx, ww, bb, mask, **kw)

    f = _amp(case, build(leaves, _backend_of(case)))
    _try(f, case)
    fn = _wrap_mode(case.mode, f, leaves)
    _try(fn, case)
    err = _check(case, build, leaves) if check and base_provider(case.provider) in KERNEL_PROVIDERS else None
    return Prepared(fn, flops, nnz / mask.numel(), max_rel_err=err)


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
    if case.provider in DENSE_PROVIDERS:
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
    f = _amp(case, f)
    _try(f, case)
    fn = _wrap_mode(case.mode, f, [a, b])
    _try(fn, case)
    return Prepared(fn, 2.0 * n * nnz * _pass_factor(case.mode), nnz / mask.numel())


def _prepare_conv(case: Case, gen: torch.Generator, check: bool = False) -> Prepared:
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

    def build(tensors, backend):
        xx, ww = tensors
        if backend is None:
            return lambda: F.conv2d(xx, ww, None, s, p)
        kw = {**_sk_kwargs(case), "backend": backend}
        return lambda: sparsekern.sparse_conv2d(xx, ww, None, mask, None, s, p, **kw)

    f = _amp(case, build([x, w], _backend_of(case)))
    _try(f, case)
    fn = _wrap_mode(case.mode, f, [x, w])
    _try(fn, case)
    err = _check(case, build, [x, w]) if check and base_provider(case.provider) in KERNEL_PROVIDERS else None
    algo = ""
    if base_provider(case.provider) == "cpp":
        b = block_of(case.layout)
        pat = formats.pattern_of(mask, "block" if b else "unstructured", b)
        dt = torch.bfloat16 if case.provider in AUTOCAST_PROVIDERS else x.dtype
        algo = "/".join(conv2d_algo(op, x.shape, w.shape, s, p, pattern=pat, dtype=dt) for op in ("fwd", "dx", "dw"))
    flops = 2.0 * shape.positions(case.batch) * nnz * _pass_factor(case.mode)
    return Prepared(fn, flops, nnz / mask.numel(), conv_algo=algo, max_rel_err=err)


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


def build_model(kind: str, width: int, num_classes: int = 10) -> tuple[torch.nn.Module, tuple[int, ...], set[str]]:
    """``(model, input shape without batch, names of layers kept dense)`` of a :class:`ModelShape`.

    ``"resnet18"``: :class:`sparsekern.models.ResNet18` of width ``nf = width`` on 32x32 inputs;
    ``"mlp"``: :class:`sparsekern.models.MLP` as a transformer-style feed-forward stack
    ``d -> width -> d`` twice (``d = 768``, or ``width / 2`` for small widths).  The layers kept
    dense are the models' :meth:`default_dense` ones (the stem and the classifier).
    """
    if kind == "resnet18":
        model, in_shape = ResNet18(num_classes, nf=width), (3, 32, 32)
    elif kind == "mlp-cl":
        model, in_shape = MLP((784,), (width, width), num_classes), (784,)
    elif kind == "mlp":
        dim = 768 if width >= 768 else max(8, width // 2)
        model, in_shape = MLP((dim,), (width, width), num_classes, activation="gelu", residual=True), (dim,)
    else:
        raise ValueError(f"kind: expected 'resnet18', 'mlp' or 'mlp-cl', got {kind!r}")
    return model, in_shape, set(model.default_dense())


def _prepare_train(case: Case, gen: torch.Generator) -> Prepared:
    shape: ModelShape = case.shape
    dev, dt = torch.device(case.device), torch_dtype(case.dtype)
    torch.manual_seed(0)
    model, in_shape, keep = build_model(shape.model, shape.width)
    provider = base_provider(case.provider)
    if provider != "dense":
        if provider == "torch.sparse":
            raise Skip("torch.sparse has no training modules (sparsify_ targets sparsekern backends)")
        b = block_of(case.layout)
        cfg = sparsekern.SparsityConfig(
            sparsity=case.sparsity,
            layout="block" if b else "unstructured",
            block_size=b,
            backend=None if provider == "auto" else provider,
            keep_dense=tuple(sorted(keep)),
        )
        sparsekern.sparsify_(model, cfg)
    model = model.to(dev, dt).train()
    steps = 1 if case.op == "train_step" else shape.steps_per_epoch
    xs = [torch.randn(case.batch, *in_shape, generator=gen).to(dev, dt) for _ in range(steps)]
    ys = [torch.randint(0, 10, (case.batch,), generator=gen).to(dev) for _ in range(steps)]
    if provider == "auto":  # the library's own path: compact dW and the optimizer step on G
        opt = sparsekern.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, model=model, grad_layout="compact")
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    amp = case.provider in AUTOCAST_PROVIDERS  # the forward under bf16 autocast, the backward outside

    def epoch():
        for x, y in zip(xs, ys):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
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


def prepare(case: Case, seed: int = 0, *, check: bool = False) -> Prepared:
    """Build ``case``'s inputs and callable (raises :class:`Skip` when the provider cannot run it).

    ``check``: for the compiled kernels (cpp, triton, cuda) on linear / spmm / conv2d, compare the
    outputs of the case's mode with the reference backend in fp32 first (``max_rel_err``).
    """
    ok, why = availability(case.provider, case.device)
    if not ok:
        raise Skip(why)
    if case.provider in SPARSEKERN_PROVIDERS and case.layout == "dense":
        raise Skip("a sparsekern provider needs a sparse layout")
    if case.dtype == "tfloat32" and case.device != "cuda":
        raise Skip("tfloat32 (TF32 allowed) is a setting of CUDA runs")
    gen = torch.Generator().manual_seed(seed)
    if case.op in ("spmm", "linear", "conv2d"):
        return _PREPARE[case.op](case, gen, check)
    return _PREPARE[case.op](case, gen)
