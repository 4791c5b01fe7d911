"""Per-layer choice between the sparse kernels and dense masked compute ("auto").

A sparse kernel loses to dense compute on small layers, at low sparsity and at tiny batches.
When a call's backend is chosen automatically (no ``backend=`` argument, no
``SPARSEKERN_BACKEND``), the call runs either on the sparse kernels of the automatic backend or
on :data:`DENSE` — dense PyTorch on ``W⊙M`` with the same semantics (forward on ``W⊙M``, ``dW``
exactly zero outside ``G``) — whichever is faster for that call's *key*: op, weight shape, conv
parameters, layout, weight and gradient density, input shape, dtype, thread count, backend and
whether a backward follows.

How a key is decided, once per process (``SPARSEKERN_AUTO``):

* ``probe`` (default): rules first — density above :data:`DENSE_ABOVE` or fewer than
  :data:`TINY_FLOPS` dense FLOPs run dense; otherwise a one-time timed probe on the call's own
  tensors (outside autograd) runs both paths in alternating rounds and keeps the faster; the
  sparse kernels must win by :data:`MARGIN` to be kept, so a layer is never knowingly slower
  than dense.
* ``rules``: the rules only; every other call runs the sparse kernels (no timing at all).
* ``off``: always the sparse kernels (the behaviour before this module existed).

Results are bit-identical run to run for a fixed decision.  Decisions are recorded
(:func:`decisions`), can be saved and loaded (:func:`save_decisions`, :func:`load_decisions`, or
``SPARSEKERN_DECISIONS=path.json`` which loads a file at first use and writes new decisions to
it), and pinned per layer by passing ``backend=`` explicitly.  :func:`explain` prints, per sparse
layer of a model, what its last call ran and why.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import reference
from ._backends import Backend, ConvParams
from .formats import flat_index

__all__ = [
    "DENSE",
    "DENSE_ABOVE",
    "MARGIN",
    "TINY_FLOPS",
    "Decision",
    "DenseBackend",
    "choose",
    "clear_decisions",
    "decisions",
    "explain",
    "last_decision",
    "load_decisions",
    "mode",
    "save_decisions",
]

MODE_VAR = "SPARSEKERN_AUTO"
FILE_VAR = "SPARSEKERN_DECISIONS"
MODES = ("probe", "rules", "off")
#: density above which a layer runs dense without a probe
DENSE_ABOVE = 0.5
#: dense FLOPs of one call below which the layer runs dense without a probe (too small to time)
TINY_FLOPS = 2e6
#: the sparse kernels are kept only if the probe finds them at least this much faster
MARGIN = 1.05
#: timed rounds per path in a probe (after one warm-up each)
PROBE_ROUNDS = 3


class DenseBackend(Backend):
    """Dense PyTorch on ``W⊙M``: the fall-back for calls the sparse kernels would lose.

    Same semantics as the kernels, by running the reference's definitions
    (:mod:`sparsekern.reference`): a pruned weight does not exist (a NaN or Inf stored outside
    ``M``, or one in ``x`` / ``dy`` meeting only pruned weights, never reaches a result), ``dW``
    is exactly zero outside ``G``.
    """

    name = "dense"
    channels_last = True

    # A large linear weight runs in slices of about CHUNK elements: the masked copy ``W⊙M`` (and,
    # for a compact gradient, the product ``dyᵀx``) is then never formed whole, so the fall-back
    # (and the probe that times it) needs a slice of memory where the sparse kernels need none.
    def linear_fwd(self, x, weight, bias, pattern):
        rows = _chunk(weight.shape[0], weight.shape[1])
        if not reference._all_finite(x):
            _KEPT.drop(weight)
            return reference.linear_fwd(x, weight, bias, pattern.mask)
        if rows is None:
            return torch.nn.functional.linear(x, _KEPT.made(weight, pattern.mask), bias)
        _KEPT.drop(weight)
        m = pattern.mask
        y = x.new_empty(x.shape[0], weight.shape[0])
        for a in range(0, weight.shape[0], rows):
            b = min(a + rows, weight.shape[0])
            y[:, a:b] = torch.nn.functional.linear(x, reference._masked(weight[a:b], m[a:b]), None)
        return y if bias is None else y.add_(bias)

    def linear_dx(self, dy, weight, pattern):
        cols = _chunk(weight.shape[1], weight.shape[0])
        if not reference._all_finite(dy):
            _KEPT.drop(weight)
            return reference.linear_dx(dy, weight, pattern.mask)
        if cols is None:
            return dy @ _KEPT.taken(weight, pattern.mask)
        m = pattern.mask
        dx = dy.new_empty(dy.shape[0], weight.shape[1])
        for a in range(0, weight.shape[1], cols):
            b = min(a + cols, weight.shape[1])
            dx[:, a:b] = dy @ reference._masked(weight[:, a:b], m[:, a:b])
        return dx

    def linear_dw(self, dy, x, grad_pattern):
        return reference.linear_dw(dy, x, grad_pattern.mask)

    def conv2d_fwd(self, x, weight, bias, pattern, conv: ConvParams):
        if weight.shape[1]:
            wm = _KEPT.made(weight, pattern.mask)
            if reference._all_finite(x, wm):
                return torch.nn.functional.conv2d(x, wm, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
            _KEPT.drop(weight)
        return reference.conv2d_fwd(x, weight, bias, pattern.mask, conv)

    def conv2d_dx(self, dy, weight, pattern, input_shape, conv: ConvParams):
        wm = _KEPT.taken(weight, pattern.mask)
        if reference._all_finite(dy, wm):  # as the reference's finite case, on the kept W⊙M
            return torch.nn.grad.conv2d_input(
                list(input_shape), wm, dy, conv.stride, conv.padding, conv.dilation, conv.groups
            )
        return reference.conv2d_dx(dy, weight, pattern.mask, tuple(input_shape), conv)

    def conv2d_dx_dw(self, dy, x, weight, pattern, grad_pattern, conv: ConvParams):
        """Both gradients from one ``convolution_backward`` call, as autograd's own conv does
        (non-finite inputs: the reference's two passes)."""
        wm = _KEPT.taken(weight, pattern.mask)
        if not reference._all_finite(dy, x, wm):
            return (
                self.conv2d_dx(dy, weight, pattern, tuple(x.shape), conv),
                self.conv2d_dw(dy, x, grad_pattern, tuple(weight.shape), conv),
            )
        dx, dw, _ = torch.ops.aten.convolution_backward(
            dy,
            x,
            wm,
            None,
            list(conv.stride),
            list(conv.padding),
            list(conv.dilation),
            False,
            [0, 0],
            conv.groups,
            [True, True, False],
        )
        return dx, reference._zero_outside_(dw, grad_pattern.mask)

    def conv2d_dw(self, dy, x, grad_pattern, weight_shape, conv: ConvParams):
        return reference.conv2d_dw(dy, x, grad_pattern.mask, tuple(weight_shape), conv)

    # compact weight gradients: gather ``G``'s entries of the unmasked product (zeroing the rest
    # first, as the dense ``dW`` does, would be a wasted weight-sized pass)
    def linear_dw_values(self, dy, x, grad_pattern):
        idx = flat_index(grad_pattern)
        out_f, in_f = dy.shape[1], x.shape[1]
        rows = _chunk(out_f, in_f)
        if rows is None:
            return (dy.t() @ x).reshape(-1).index_select(0, idx)
        # the flat positions are row-major: each slice of rows owns one run of them
        bounds = torch.searchsorted(idx, torch.arange(0, out_f + rows, rows).clamp_(max=out_f).mul_(in_f).to(idx))
        parts = []
        for i, a in enumerate(range(0, out_f, rows)):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            prod = dy[:, a : a + rows].t() @ x
            parts.append(prod.reshape(-1).index_select(0, (idx[lo:hi] - a * in_f).long()))
        return torch.cat(parts)

    def conv2d_dw_values(self, dy, x, grad_pattern, weight_shape, conv: ConvParams):
        dw = reference.conv_dw_unmasked(dy, x, tuple(weight_shape), conv)
        return dw.reshape(-1).index_select(0, flat_index(grad_pattern))


class _KeptMasked:
    """``W⊙M`` made by a forward on :data:`DENSE`, kept for the input gradient of the same step.

    The forward and the input gradient of one training step both need the masked weight; making
    it once saves a weight-sized pass per layer and step.  An entry is used only while neither
    the weight nor the mask has been written since (same tensors, same version counters), is
    handed to the backward once and dropped there (so a later step never sees it), and is kept
    only for a weight that trains; a layer's next forward replaces it.  A weight dying drops it.
    A kept copy is held from the forward to the backward, like a saved activation, so only
    weights of at most :data:`KEEP_MAX` elements are kept: on ResNet-18 nf64 keeping every dense
    fall-back layer's copy raised the training peak by 31 MB (``python -m sparsekern.bench --memory``).
    """

    def __init__(self) -> None:
        self._d = WeakIdKeyDictionary()

    @staticmethod
    def _versions(weight, mask):
        try:
            return (weight._version, id(mask), mask._version)
        except RuntimeError:  # inference tensors have no version counter
            return None

    def made(self, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        wm = reference._masked(weight, mask)
        key = self._versions(weight, mask)
        small = weight.numel() <= KEEP_MAX
        if key is not None and small and weight.requires_grad and not torch.is_grad_enabled():  # in a forward
            self._d[weight] = (key, wm)
        else:
            self.drop(weight)
        return wm

    def drop(self, weight: torch.Tensor) -> None:
        """Forget ``weight``'s entry (a forward that did not make one)."""
        self._d.pop(weight, None)

    def taken(self, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        entry = self._d.pop(weight, None)
        if entry is not None and entry[0] == self._versions(weight, mask):
            return entry[1]
        return reference._masked(weight, mask)


_KEPT = _KeptMasked()

#: largest weight (elements) whose ``W⊙M`` is kept from a forward for its backward (4 MB in fp32)
KEEP_MAX = 1 << 20

#: elements of the weight slice the dense fall-back forms at a time (16 MB in fp32)
CHUNK = 1 << 22


def _chunk(n: int, inner: int) -> int | None:
    """Rows (of ``n``, each ``inner`` long) per slice, or ``None`` when the whole fits a chunk."""
    if n * inner <= CHUNK:
        return None
    return max(1, CHUNK // max(inner, 1))


DENSE = DenseBackend()


@dataclass(frozen=True)
class Decision:
    """What a key runs on and why.

    ``path`` is ``"sparse"`` or ``"dense"``; ``backend`` the backend that runs it; ``reason`` a
    short sentence; ``sparse_ms`` / ``dense_ms`` the probe's medians (``None`` without a probe).
    """

    key: str
    path: str
    backend: str
    reason: str
    sparse_ms: float | None = None
    dense_ms: float | None = None


_LOCK = threading.Lock()
_DECISIONS: dict[str, Decision] = {}
_LOADED_FILE: list[str] = []
_LAST = threading.local()


def mode() -> str:
    """The ``SPARSEKERN_AUTO`` mode (read at call time): ``probe``, ``rules`` or ``off``."""
    m = os.environ.get(MODE_VAR, "").strip().lower() or "probe"
    if m not in MODES:
        raise ValueError(f"{MODE_VAR}: expected one of {MODES}, got {m!r}")
    return m


def decisions() -> dict[str, Decision]:
    """Every decision taken (or loaded) in this process, by key."""
    with _LOCK:
        return dict(_DECISIONS)


def clear_decisions() -> None:
    """Forget every decision (the next call of each key decides again)."""
    with _LOCK:
        _DECISIONS.clear()
        _LOADED_FILE.clear()


def save_decisions(path: str | os.PathLike) -> None:
    """Write every decision to ``path`` (JSON), for :func:`load_decisions` in a later run."""
    with _LOCK:
        rows = [asdict(d) for d in _DECISIONS.values()]
    with open(path, "w") as f:
        json.dump({"version": 1, "decisions": rows}, f, indent=1)


def load_decisions(path: str | os.PathLike) -> int:
    """Pin the decisions stored in ``path``; returns how many were loaded."""
    try:
        with open(path) as f:
            data = json.load(f)
        rows = data["decisions"]
        loaded = [Decision(**r) for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"path: {path} is not a sparsekern decisions file ({exc})") from exc
    for d in loaded:
        if d.path not in ("sparse", "dense"):
            raise ValueError(f"path: {path}: decision path must be 'sparse' or 'dense', got {d.path!r}")
    with _LOCK:
        for d in loaded:
            _DECISIONS[d.key] = d
    return len(loaded)


def last_decision() -> Decision | None:
    """The decision of the last call made on this thread (``None`` before any automatic call)."""
    return getattr(_LAST, "decision", None)


def _persist_file() -> str | None:
    path = os.environ.get(FILE_VAR, "").strip()
    if not path:
        return None
    if path not in _LOADED_FILE:
        _LOADED_FILE.append(path)
        if os.path.exists(path):
            load_decisions(path)
    return path


def _batch_bucket(n: int) -> str:
    """The batch part of a decision key: the power of two at or above ``n`` ("<=64"), so that the
    sizes one run sees (a last partial batch, a replay sample appended to the batch) share one
    probe instead of paying one each inside the timed epochs."""
    return f"<={1 << max(0, int(n) - 1).bit_length()}"


def _key(op, backend, x, weight, pattern, gpattern, conv, training, compact=False) -> str:
    dens, gdens = pattern.density(), gpattern.density()  # cached with the pattern
    parts = [
        op,
        backend.name,
        str(tuple(weight.shape)),
        str((_batch_bucket(x.shape[0]), *x.shape[1:])),
        str(x.dtype).replace("torch.", ""),
        pattern.layout,
        str(pattern.block_size),
        f"d{dens:.2f}",
        # the gradient mask only matters where a backward runs: an inference call (evaluation,
        # BN recalibration) keeps one decision while a method moves G from task to task
        f"g{gdens:.2f}" if training else "g-",
        f"t{torch.get_num_threads()}",
        "train" if training else "infer",
    ]
    if training and compact:
        parts.append("compact")
    if conv is not None:
        parts.append(f"s{conv.stride}p{conv.padding}d{conv.dilation}g{conv.groups}")
    return "|".join(parts)


def _dense_flops(op, x, weight, conv) -> float:
    if op == "linear":
        return 2.0 * x.numel() // max(weight.shape[1], 1) * weight.numel()
    n, _, h, w = x.shape
    kh, kw = weight.shape[2:]
    ho = (h + 2 * conv.padding[0] - conv.dilation[0] * (kh - 1) - 1) // conv.stride[0] + 1
    wo = (w + 2 * conv.padding[1] - conv.dilation[1] * (kw - 1) - 1) // conv.stride[1] + 1
    return 2.0 * n * ho * wo * weight.numel()


def _runner(op, be, x, weight, bias, pattern, gpattern, conv, dy, training, compact=False):
    """One call's work on ``be``: the weight gradient as the layer takes it (compact: the values on
    ``G`` only, as ``linear_dw_values`` / ``conv2d_dw_values``; else dense)."""
    if op == "linear":
        dw = be.linear_dw_values if compact else be.linear_dw

        def run():
            be.linear_fwd(x, weight, bias, pattern)
            if training:
                be.linear_dx(dy, weight, pattern)
                dw(dy, x, gpattern)
    else:
        dw = be.conv2d_dw_values if compact else be.conv2d_dw

        def run():
            be.conv2d_fwd(x, weight, bias, pattern, conv)
            if training:
                be.conv2d_dx(dy, weight, pattern, tuple(x.shape), conv)
                dw(dy, x, gpattern, tuple(weight.shape), conv)

    return run


def _probe(op, be, x, weight, bias, pattern, gpattern, conv, training, compact=False) -> tuple[float, float]:
    """Median ms of one fwd (+ dx + dw) call on each path, alternating rounds after a warm-up."""
    if weight.dtype != x.dtype:  # the float32 master weight of a bf16 autocast call: time on its cast
        weight = weight.detach().to(x.dtype)
    with torch.no_grad():
        y = (
            DENSE.linear_fwd(x, weight, bias, pattern)
            if op == "linear"
            else DENSE.conv2d_fwd(x, weight, bias, pattern, conv)
        )
        dy = torch.randn_like(y) if training else None
        runs = {
            "sparse": _runner(op, be, x, weight, bias, pattern, gpattern, conv, dy, training, compact),
            "dense": _runner(op, DENSE, x, weight, bias, pattern, gpattern, conv, dy, training, compact),
        }
        times: dict[str, list[float]] = {"sparse": [], "dense": []}
        for r in range(PROBE_ROUNDS + 1):
            for name in ("sparse", "dense") if r % 2 else ("dense", "sparse"):
                t0 = time.perf_counter()
                runs[name]()
                if r:  # round 0 warms both paths up
                    times[name].append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times["sparse"]), statistics.median(times["dense"])


def _decide(op, be, x, weight, bias, pattern, gpattern, conv, training, key, how, compact=False) -> Decision:
    dens = float(key.split("|d")[1].split("|")[0])
    if dens > DENSE_ABOVE:
        return Decision(key, "dense", DENSE.name, f"density {dens:.2f} > {DENSE_ABOVE}: sparse kernels cannot win")
    flops = _dense_flops(op, x, weight, conv)
    if flops < TINY_FLOPS:
        return Decision(key, "dense", DENSE.name, f"{flops:.2g} dense FLOPs per call < {TINY_FLOPS:.0e}: too small")
    if how == "rules":
        return Decision(key, "sparse", be.name, "rules mode: no probe")
    ts, td = _probe(op, be, x, weight, bias, pattern, gpattern, conv, training, compact)
    if td >= ts * MARGIN:
        return Decision(key, "sparse", be.name, f"probe: sparse {ts:.3g} ms vs dense {td:.3g} ms", ts, td)
    return Decision(
        key,
        "dense",
        DENSE.name,
        f"probe: sparse {ts:.3g} ms vs dense {td:.3g} ms (sparse must win by {MARGIN}x)",
        ts,
        td,
    )


def choose(
    op: str,
    be: Backend,
    x,
    weight,
    bias,
    pattern,
    gpattern,
    conv: ConvParams | None = None,
    *,
    training: bool | None = None,
    compact: bool = False,
) -> Backend:
    """The backend that runs an automatically dispatched call: ``be`` (sparse) or :data:`DENSE`.

    ``op`` is ``"linear"`` (``x`` 2-D) or ``"conv2d"`` (``x`` 4-D).  Only the CPU kernels are
    decided here; other devices keep ``be`` (their probe would need device timing).
    ``training``: whether a backward follows (``None``: from grad mode and ``requires_grad``; the
    registered ops of a traced call pass what the trace saw).  Under tracing a key not yet decided
    is decided by the rules, never by a timed probe.  ``compact``: the weight gradient is taken
    compactly on ``G`` (a layer in compact-gradient mode); the probe then times that path, and it
    is part of the key.
    """
    how = mode()
    if how == "off" or be.name == "reference" or x.device.type != "cpu":
        _LAST.decision = None
        return be
    if how == "probe" and torch.compiler.is_compiling():
        how = "rules"
    if training is None:
        training = torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)
    key = _key(op, be, x, weight, pattern, gpattern, conv, training, compact)
    path = _persist_file()
    with _LOCK:
        dec = _DECISIONS.get(key)
    if dec is None:
        dec = _decide(op, be, x, weight, bias, pattern, gpattern, conv, training, key, how, compact)
        with _LOCK:
            _DECISIONS[key] = dec
        if path is not None:
            save_decisions(path)
    _LAST.decision = dec
    return DENSE if dec.path == "dense" else be


def explain(model: torch.nn.Module, *, file=None) -> list[dict]:
    """Print (and return) per sparse layer what its last call ran and why.

    A layer that has not run yet shows ``not run yet``: decisions depend on the input shape.
    """
    from .nn import SparseConv2d, SparseLinear

    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, (SparseLinear, SparseConv2d)):
            continue
        dec = getattr(m, "last_choice", None)
        if m.backend is not None:
            ran, why = m.backend, "pinned by backend="
        elif dec is None:
            ran, why = "not run yet", f"automatic; SPARSEKERN_AUTO={mode()}"
        else:
            ran, why = f"{dec.path} ({dec.backend})", dec.reason
        rows.append(
            {
                "layer": name or type(m).__name__,
                "type": type(m).__name__,
                "shape": tuple(m.weight.shape),
                "density": round(m.density(), 4),
                "layout": m.layout,
                "runs": ran,
                "why": why,
            }
        )
    if rows:
        w = max(len(r["layer"]) for r in rows)
        lines = [f"{'layer':<{w}}  {'density':>7}  {'runs':<16}  why"]
        lines += [f"{r['layer']:<{w}}  {r['density']:>7.4f}  {r['runs']:<16}  {r['why']}" for r in rows]
        print("\n".join(lines), file=file)
    return rows
