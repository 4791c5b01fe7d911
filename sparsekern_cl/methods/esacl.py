"""EsaCL: sharpness-aware directional pruning (SDP) and intelligent data selection (IDS).

Methods ``esacl_er``, ``esacl_derpp`` and ``esacl_ewc`` (see :mod:`sparsekern_cl.registry`): the ER,
DER++ and online-EWC strategies of the core plus one :class:`EsaCLPlugin`.  The run's ``sparsity`` is the target
sparsity ``s`` of every pruned layer; the layers the core makes sparse (all but the backbone's
``keep_dense`` layers, e.g. the MLP's head) are the ones EsaCL optimises with Frank-Wolfe, prunes,
freezes and expands.  The paper (Ren & Honavar, arXiv 2401.05667, Algorithm 1) leaves many
choices open and has no public code; every choice below is ours.

One training step (``esacl_sa``, ``esacl_sse``, ``esacl_ere`` on)::

    losses = per-example CE of the current batch B at θ          (one forward, no graph)
    B_s = top-J_s of B by loss (SSE),  B_e = top-J_e of B by loss (ERE)
    g_s = ∇ CE(θ; B_s)                                          (SAM's first pass)
    ε = ρ g_s / ‖g_s‖ ;  θ ← θ + ε
    g = ∇ strategy_loss(θ+ε; B_e, replay samples)                (SAM's second, "outer" pass)
    θ ← θ − ε  (exact copy back)
    per pruned layer, on its trainable coordinates G:
        m ← m + g                     (eq. 3.15, α = 1, see below)
        v = LMO_C(K, λ)(m)            (−λ sign(m) on the K largest |m|, 0 elsewhere)
        θ ← θ + η (v − θ)             (Frank-Wolfe step)
    other parameters (head, biases, norm layers): the strategy's optimizer with the outer gradient

Every mechanism, marked *as written* (Algorithm 1 and §3 of the paper) or *deviation: why*
(config keys in brackets; the paper leaves many details open and has no public code):

- **SAM perturbation** ε = ρ g_s/‖g_s‖ from the current task's cross-entropy on B_s (line 5):
  as written.  The outer pass is the strategy's full loss (replay or EWC terms included) on B_e
  with the replay samples drawn once per step: deviation, the paper's line 6 names only ℓ on B_s,
  but its methods are EsaCL-ER/DER++/EWC, whose loss is the strategy's.  ε covers every trainable
  parameter; frozen weights get exact zeros from the kernels and frozen shared entries are
  masked out, so nothing frozen is perturbed.
- **Support and redundant examples share one ranking** (SSE, ERE): both keep the top-J examples of
  the batch by their loss at θ (as written for SSE; for ERE the paper itself approximates the
  influence bound ‖∇ℓ(x, θ+ε)‖ by the loss).  ``esacl_rank: per_class`` (default) ranks each
  class of the batch on its own and keeps the top fraction of each, so the selection has the
  batch's class mix.  Deviation (the paper ranks the batch): the hardest examples of a two-class
  task are mostly of one class, and batch norm over a subset of one class removes the class mean
  from every feature.  EsaCL-DER++ on ResNet-18 (embedded MNIST at 32×32, nf 8, batch 32, lr 0.1,
  τ 5, s = 0.8, one epoch per task): ranked over the batch, the first task's training loss stays
  at 1.37–1.57 and the run ends at chance (Task-IL 50–56 %; 4 runs: twice as is, w/o SA, w/o
  SP); ranked per class, 0.31–0.39 and 80–93 % (3 runs, seeds 0 and 1); a random subset of the
  same size gives 0.34 / 83 %, no selection (w/o SSE / ERE) 0.33 / 85 %.  Normalising the subset
  with the whole batch's statistics instead (as constants) made the Frank-Wolfe step diverge.
  ``batch`` (preset ``esacl-batch-rank``) is the earlier behaviour.  The loss is computed once,
  by a forward without a graph, so with equal fractions (``esacl_sse_frac`` = ``esacl_ere_frac`` =
  0.4, the paper's 40 %) B_s = B_e.  SSE off: the perturbation uses the whole batch; ERE off: the outer step does.
  Without SA there is no perturbation and SSE has no effect.
- **Momentum** ``esacl_momentum_form: sum`` is eq. 3.15, ``m ← m + α g``: as written (the LMO
  depends on m only through signs and the ranking of ``|m|``, so α has no effect and is 1).
  ``ema`` (``m ← β m + (1 − β) g``, stochastic Frank-Wolfe's) is a variant.  m is reset at every
  task start: deviation, unstated in the paper; an old task's momentum would steer the new one.
- **LMO** of the K-sparse polytope (eq. 3.13): as written, per layer over its trainable
  coordinates.  K = round(``esacl_k`` × trainable weights); the radius λ = ``esacl_tau`` × the RMS
  of the layer's weights at initialisation: deviation, the paper gives τ without a unit; a
  per-coordinate scale lets one τ fit layers of any width.
- **Frank-Wolfe step** ``esacl_fw_step``: ``constant`` is eq. 3.12 with η = lr, as written, but it
  pulls the iterate to a single vertex within a few dozen steps; ``rescaled`` (default) is
  stochastic Frank-Wolfe's η = clamp(lr·‖g‖/‖θ − v‖, 0, 1) per layer: deviation, for stability.
  The Frank-Wolfe layers leave the optimizer; ``esacl_sp: false`` ("w/o SP") trains them with it.
  The other parameters (head, biases, norm layers) use the strategy's optimizer: deviation, the
  paper's update covers θ without saying which parts.
- **Budget** (the capacity formula, eq. 6.24: a model of sparsity S holds (1 − S) of its weights):
  each pruned layer keeps at most k = its number of weights at the run's initial mask (the core's
  sparsification at ``sparsity``, so ``uniform`` and ``erk`` both work), at every step: as written
  (EsaCL reports capacity 1 − S).
- **Pruning** (line 11) at every task end, in one shot by magnitude, without retraining: as
  written.  With ``esacl_freeze: subnetwork`` (default) tasks share the budget equally: task t
  (of T) keeps its largest weights up to round(k (t+1)/T) in all, the others are removed.
  Deviation (the paper prunes "with sparsity ratio s" and leaves the split open): pruning every
  task to s and freezing everything would leave no capacity for any later task.  After the last
  task the layer holds exactly k weights (sparsity s).
- **Freezing** (line 12, "freeze the pruned parameters and their connections"), ``esacl_freeze:
  subnetwork``: every survivor of the pruning is frozen (it leaves the gradient mask, so the
  kernels skip its gradient, and its value is restored after every optimizer step); after the
  first task every shared parameter (biases, normalisation layers' affine parameters, dense layers
  other than the head) is frozen, and after each task the head rows of its classes.  As written
  for the weights; deviation for the rest: the paper does not say, and letting shared parameters
  move would undo the isolation of the frozen weights (PackNet freezes biases and BatchNorm after
  the first task the same way).
- **BatchNorm running statistics** are not frozen, and at every task end, after the pruning, they
  are set to the exact statistics of the pruned network on the task's training data and the
  replay buffer's examples of earlier tasks (one forward pass, counted in the FLOPs).  Deviation
  (the paper does not say): with one shared mask the weights that later tasks grow feed the same
  BatchNorm layers, so frozen statistics keep no task's function exact; frozen at the first
  task's values they no longer fit the grown layers, which the frozen normalisation then
  amplifies layer after layer (ResNet-18 on MNIST: activations of 1e9 at the first step of task
  1, the Frank-Wolfe step not finite).  And the running averages describe neither the pruned
  network nor, after a short task, the data (a task of 25 steps keeps 0.9^25 = 7 % of their
  initial values): evaluated with them the pruned network was at chance.  ``esacl_freeze: quota`` (preset
  ``esacl-quota``, the earlier default): the survivors fill the whole budget, only a per-task
  share of them is frozen, the rest stay trainable, and biases and the head are never frozen.
- **Expansion** (line 13, "reinitialize unused weights") at every task start: ``esacl_expand_scope:
  capacity`` (default) re-enters a fraction ``esacl_expand`` (1: all) of the free capacity
  k − |mask|, drawn at random among the unused weights, so training stays at sparsity s and costs
  the sparse FLOPs; task 0 trains on the initial mask (no free capacity).  Deviation from the
  literal "unused weights": re-initialising *every* unused weight (``esacl_expand_scope: unused``,
  preset ``esacl-expand-all``, the earlier default) makes every task's training dense, which
  contradicts the paper's sparse FLOPs (Table 1).  Re-entering weights are trainable; with
  ``esacl_reinit: random`` they are drawn uniformly with the RMS of the layer's initial kept
  weights (after ``sparse_rescale``), so end-of-task magnitude pruning compares like with like
  (deviation: the paper does not give the scale); with ``zero`` they start at zero.  Evaluation
  after a task sees the pruned model; the final model is a real sparse model at sparsity s.
- **sparse_rescale** (core key, on by default): the initial kept weights are scaled to the dense
  output variance.  Deviation: the paper says nothing about the initial scale; the re-initialised
  weights follow the same scale (above), so the rescale no longer favours the initial mask.
- **EWC**: after pruning the online-EWC anchor is moved to the pruned weights and the Fisher is
  zeroed outside the kept mask, so removed weights are free capacity, not pulled back (our choice).
- **Examples dropped by IDS** are never forwarded in the passes they are dropped from; the FLOP
  counter sees the ranking forward, both SAM passes and the replay passes as they run.
- **Stored masks** (model capacity, eq. 6.24): one shared mask, T = 1: as written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F

from ..options import check_group, choice, flag, group_defaults, number
from ..strategies import Plugin, StepContext, Strategy
from .isolation import (
    FrozenEntries,
    head_rows,
    recalibrate_norm_statistics,
    shared_parameter_names,
)
from .masking import pick

__all__ = [
    "EsaCLConfig",
    "EsaCLPlugin",
    "lmo_ksparse",
    "fw_step",
    "sam_perturbation",
    "top_j",
    "CONFIG_KEYS",
    "ESACL_PRESETS",
    "check_config",
    "make_esacl_plugins",
]


@dataclass(frozen=True)
class EsaCLConfig:
    """EsaCL: sharpness-aware directional pruning (SDP) and intelligent data selection (IDS)"""

    esacl_rho: float = number(0.05, "EsaCL: SAM neighbourhood radius rho", "[0, inf]")
    esacl_tau: float = number(
        5.0, "EsaCL: K-sparse polytope radius, in units of the layer's initial RMS weight", "(0, inf]"
    )
    esacl_k: float = number(
        0.05, "EsaCL: fraction of a layer's trainable weights that are nonzero in an LMO vertex", "[0, 1]"
    )
    esacl_sse_frac: float = number(
        0.4, "EsaCL: fraction J of the batch kept as support examples (SAM's perturbation)", "(0, 1]"
    )
    esacl_ere_frac: float = number(
        0.4, "EsaCL: fraction J of the batch kept by redundant-example elimination (outer step)", "(0, 1]"
    )
    esacl_sa: bool = flag(True, "EsaCL: sharpness-aware perturbation on (false: 'w/o SA')")
    esacl_sp: bool = flag(
        True, "EsaCL: sparse projection, Frank-Wolfe over the K-sparse polytope (false: 'w/o SP', plain optimizer)"
    )
    esacl_sse: bool = flag(True, "EsaCL: support example selection on (false: 'w/o SSE')")
    esacl_rank: str = choice(
        "per_class",
        "EsaCL: how SSE / ERE rank the batch by loss: 'per_class' (the top fraction of each class's examples) "
        "or 'batch' (of the whole batch, the variant preset esacl-batch-rank)",
        ("per_class", "batch"),
    )
    esacl_ere: bool = flag(True, "EsaCL: redundant example elimination on (false: 'w/o ERE')")
    esacl_momentum_form: str = choice(
        "sum", "EsaCL: 'sum' (m <- m + g, eq. 3.15) or 'ema' (m <- b m + (1-b) g)", ("sum", "ema")
    )
    esacl_momentum: float = number(0.9, "EsaCL: b of the 'ema' momentum", "[0, 1]")
    esacl_fw_step: str = choice(
        "rescaled",
        "EsaCL: Frank-Wolfe step 'rescaled' (clamp(lr |g|/|theta-v|, 0, 1)) or 'constant' (lr)",
        ("rescaled", "constant"),
    )
    esacl_expand: float = number(
        1.0,
        "EsaCL: fraction of the expansion scope (esacl_expand_scope) re-entering the mask at each task start",
        "[0, 1]",
    )
    esacl_expand_scope: str = choice(
        "capacity",
        "EsaCL: 'capacity' (expand only into the free capacity of the sparsity budget: training stays sparse) "
        "or 'unused' (into every unused weight: dense training, the variant preset esacl-expand-all)",
        ("capacity", "unused"),
    )
    esacl_freeze: str = choice(
        "subnetwork",
        "EsaCL: 'subnetwork' (Algorithm 1: after each task freeze every survivor of the pruning, the shared "
        "parameters after the first task and the head rows of finished tasks) or 'quota' (freeze a per-task "
        "share of the survivors only, the variant preset esacl-quota)",
        ("subnetwork", "quota"),
    )
    esacl_reinit: str = choice(
        "random",
        "EsaCL: values of re-entering weights: 'random' (uniform, at the RMS of the layer's initial kept weights) "
        "or 'zero'",
        ("random", "zero"),
    )


CONFIG_KEYS: MappingProxyType = MappingProxyType(group_defaults(EsaCLConfig))

# named variants of the defaults (which follow Algorithm 1): what the earlier defaults did, piece by piece
ESACL_PRESETS: MappingProxyType = MappingProxyType(
    {
        # every unused weight re-enters at each task start, task 0 included: dense training
        "esacl-expand-all": {"esacl_expand_scope": "unused", "esacl_expand": 1.0},
        # a per-task share of the survivors frozen; the rest, the biases and the head stay trainable
        "esacl-quota": {"esacl_freeze": "quota"},
        # both: the behaviour of the runs committed before issue 17 (up to the re-initialisation scale)
        "esacl-legacy": {"esacl_expand_scope": "unused", "esacl_expand": 1.0, "esacl_freeze": "quota"},
        # SSE / ERE rank the whole batch: with batch norm, ResNet-18 then trains at chance (see the docstring)
        "esacl-batch-rank": {"esacl_rank": "batch"},
    }
)


def check_config(cfg: dict) -> None:
    """The EsaCL keys of ``cfg``, and the target sparsity EsaCL needs; ``ValueError`` naming the key."""
    check_group(EsaCLConfig, cfg)
    if cfg["sparsity"] <= 0:
        raise ValueError(
            f"sparsity: EsaCL prunes to a target sparsity; expected a value in (0, 1), got {cfg['sparsity']!r}"
        )


# --------------------------------------------------------------------------- building blocks
def lmo_ksparse(m: torch.Tensor, k: int, radius: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Linear minimisation oracle of the K-sparse polytope C(K, λ) = conv{±λ on exactly K coordinates}.

    Returns ``v = argmin_{v ∈ C} <m, v>``: ``−radius·sign(m)`` on the ``k`` entries of largest
    ``|m|`` (among ``allowed`` ones), 0 elsewhere.  A zero entry of ``m`` among the top K gets
    ``−radius`` (any sign is optimal there), so ``v`` always has exactly K nonzeros.

    Args:
        m: the direction (momentum), any shape.
        k: number of nonzeros, ``0 <= k <= number of allowed entries``.
        radius: λ > 0.
        allowed: optional bool mask of the coordinates the polytope lives on (others stay 0).

    Raises:
        ValueError: ``k`` or ``radius`` out of range, or ``allowed`` of another shape.
    """
    if allowed is not None and allowed.shape != m.shape:
        raise ValueError(f"allowed: expected the shape of m {tuple(m.shape)}, got {tuple(allowed.shape)}")
    n = m.numel() if allowed is None else int(allowed.sum())
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k: expected an integer in [0, {n}], got {k!r}")
    if not radius > 0:
        raise ValueError(f"radius: expected a positive number, got {radius!r}")
    flat = m.detach().reshape(-1)
    score = flat.abs()
    if allowed is not None:
        score = score.masked_fill(~allowed.reshape(-1), -1.0)  # never chosen before an allowed entry
    v = torch.zeros_like(flat)
    if k > 0:
        idx = torch.topk(score, k, sorted=False).indices
        sgn = torch.where(flat[idx] > 0, 1.0, -1.0).to(flat.dtype)
        v[idx] = -radius * sgn
    return v.view_as(m)


def fw_step(theta: torch.Tensor, v: torch.Tensor, eta: float, allowed: torch.Tensor | None = None) -> None:
    """Frank-Wolfe update ``θ ← θ + η (v − θ)`` in place, on ``allowed`` coordinates only.

    With ``η ∈ [0, 1]`` the new iterate is a convex combination of θ and the vertex v, so it
    stays in the polytope's convex hull when θ starts there.

    Raises:
        ValueError: ``eta`` outside [0, 1].
    """
    if not 0.0 <= eta <= 1.0 or math.isnan(eta):
        raise ValueError(f"eta: expected a step in [0, 1], got {eta!r}")
    with torch.no_grad():
        new = theta + eta * (v - theta)
        if allowed is None:
            theta.copy_(new)
        else:
            theta.copy_(torch.where(allowed, new, theta))


def sam_perturbation(grads: list[torch.Tensor | None], rho: float) -> list[torch.Tensor | None]:
    """SAM's ε = ρ·g/‖g‖₂ with the norm taken over all the tensors together (``None`` stays ``None``).

    A zero gradient gives a zero perturbation.
    """
    if not rho >= 0:
        raise ValueError(f"rho: expected a non-negative radius, got {rho!r}")
    sq = sum(float((g.double() ** 2).sum()) for g in grads if g is not None)
    norm = math.sqrt(sq)
    scale = rho / norm if norm > 0 else 0.0
    return [None if g is None else g * scale for g in grads]


def top_j(losses: torch.Tensor, frac: float, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the ``max(1, round(frac·n))`` largest per-example losses, in batch order.

    With ``groups`` (one label per example, e.g. the class), each group is ranked on its own and
    keeps ``max(1, round(frac·n_g))`` of its ``n_g`` examples, so the selection has the batch's mix
    of groups.
    """
    n = losses.numel()
    if groups is not None:
        if groups.shape != losses.shape:
            raise ValueError(f"groups: expected one label per loss {tuple(losses.shape)}, got {tuple(groups.shape)}")
        if n == 0:
            return torch.zeros(0, dtype=torch.long, device=losses.device)
        keep = []
        for g in torch.unique(groups):
            pos = torch.nonzero(groups == g).flatten()
            keep.append(pos[top_j(losses[pos], frac)])
        return torch.cat(keep).sort().values
    j = max(1, min(n, int(round(frac * n))))
    if j == n:
        return torch.arange(n, device=losses.device)
    return torch.topk(losses.detach(), j, sorted=False).indices.sort().values


def _reinit_values(weight: torch.Tensor, generator: torch.Generator, rms: float) -> torch.Tensor:
    """Fresh uniform values with root mean square ``rms``: U(−√3·rms, √3·rms)."""
    bound = math.sqrt(3.0) * rms
    vals = torch.rand(weight.shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
    return vals.to(device=weight.device, dtype=weight.dtype)


# --------------------------------------------------------------------------- the plugin
class EsaCLPlugin(Plugin):
    """SDP + IDS on top of a core strategy (see the module docstring for every choice).

    Args:
        cfg: the run configuration (the ``esacl_*`` keys, ``lr``, ``seed``, ``sparsity``).
        model: the backbone, already sparsified by the core at ``sparsity``.
        n_tasks: number of tasks (sets the per-task freezing quota).
    """

    name = "esacl"

    def __init__(self, cfg: dict, model, n_tasks: int) -> None:
        import sparsekern

        check_config(cfg)
        self.cfg = cfg
        self.n_tasks = int(n_tasks)
        self.rho = float(cfg["esacl_rho"])
        self.sa, self.sp = bool(cfg["esacl_sa"]), bool(cfg["esacl_sp"])
        self.sse = bool(cfg["esacl_sse"]) and self.sa
        self.ere = bool(cfg["esacl_ere"])
        self.layers = sparsekern.sparse_modules(model)
        if not self.layers:
            raise ValueError("sparsity: EsaCL needs sparse layers to prune; expected a target sparsity > 0, got 0")
        self.model = model
        self.freeze_mode = cfg["esacl_freeze"]
        # kept budget, initial RMS and polytope radius per layer, fixed at the start of the run
        self.budget = {n: int(m.weight_mask.sum()) for n, m in self.layers}
        self.init_rms, self.radius = {}, {}
        for n, m in self.layers:
            w = m.weight.detach()
            rms = float(w[m.weight_mask].pow(2).mean().sqrt()) if self.budget[n] else 0.0
            if rms == 0.0:
                rms = 1.0 / math.sqrt(w[0].numel())
            self.init_rms[n] = rms
            self.radius[n] = float(cfg["esacl_tau"]) * rms
        self.momentum: dict[str, torch.Tensor] = {}
        self.frozen_values: dict[str, torch.Tensor] = {}
        self.shared = FrozenEntries(model)  # biases, norm layers, dense layers, head rows (esacl_freeze: subnetwork)
        self.task = 0

    # ---------------------------------------------------------------- task boundaries
    def free_capacity(self, name: str, layer) -> int:
        """Weights the layer may still add within its budget: ``k − |mask|`` (``(1 − s) n`` in all, eq. 6.24)."""
        return max(0, self.budget[name] - int(layer.weight_mask.sum()))

    @torch.no_grad()
    def begin_task(self, strategy: Strategy, task: int) -> None:
        self.task = task
        frac = float(self.cfg["esacl_expand"])
        scope = self.cfg["esacl_expand_scope"]
        for i, (n, m) in enumerate(self.layers):
            g = torch.Generator().manual_seed(int(self.cfg["seed"]) * 1_000_003 + task * 7919 + i)
            unused = ~m.weight_mask
            room = int(unused.sum()) if scope == "unused" else self.free_capacity(n, m)
            n_grow = int(round(frac * room))
            if n_grow >= int(unused.sum()):
                grow = unused
            else:
                score = torch.rand(m.weight.shape, generator=g).to(m.weight.device)
                grow = pick(unused, n_grow, score, stable=False)
            m.set_mask(m.weight_mask | grow, grad_mask=m.grad_mask | grow)
            if self.cfg["esacl_reinit"] == "random":
                vals = _reinit_values(m.weight, g, self.init_rms[n])
                m.weight.copy_(torch.where(grow, vals, m.weight))
            frozen = m.weight_mask & ~m.grad_mask
            self.frozen_values[n] = m.weight.detach()[frozen].clone()
        self.momentum = {}

    @torch.no_grad()
    def end_task(self, strategy: Strategy, task: int) -> None:
        last = task + 1 >= self.n_tasks
        for n, m in self.layers:
            k = self.budget[n]
            frozen = m.weight_mask & ~m.grad_mask
            trainable = m.grad_mask.clone()
            mag = m.weight.detach().abs()
            quota = k if last else int(round(k * (task + 1) / self.n_tasks))
            if self.freeze_mode == "subnetwork":
                # prune to the task's share of the budget and freeze every survivor
                newly = pick(trainable, quota - int(frozen.sum()), mag, stable=False)
                m.set_mask(frozen | newly, grad_mask=torch.zeros_like(trainable))
                continue
            keep = pick(trainable, k - int(frozen.sum()), mag, stable=False)
            newly = pick(keep, quota - int(frozen.sum()), mag, stable=False)
            m.set_mask(frozen | keep, grad_mask=keep & ~newly)
        if self.freeze_mode == "subnetwork":
            self._freeze_shared(strategy, task)
        self.recalibrate_norms(strategy, task)  # the pruned network's statistics
        self.momentum = {}
        _fix_ewc(strategy, self.layers)

    def _freeze_shared(self, strategy: Strategy, task: int) -> None:
        """After the first task: every shared parameter; after each task: its head rows."""
        if task == 0:
            for name in shared_parameter_names(self.model, [n for n, _ in self.layers]):
                self.shared.freeze(name)
        lo, hi = strategy.scenario.task_classes(task)
        for name, rows in head_rows(self.model, lo, hi).items():
            self.shared.freeze(name, rows)

    def n_stored_masks(self, strategy: Strategy) -> int | None:
        return 1

    def recalibrate_norms(self, strategy: Strategy, task: int) -> bool:
        """BatchNorm running statistics := the exact statistics, under the current (pruned) network, of
        ``task``'s training data and the replay buffer's examples of earlier tasks (what training saw):
        one forward pass, counted in the FLOPs."""
        sc, bs = strategy.scenario, int(self.cfg["eval_batch_size"])
        xs = [sc.train[i].x for i in strategy.training_tasks(task)]
        buf = getattr(strategy, "buffer", None)
        if buf is not None and len(buf):
            n = len(buf)
            xs.append(buf.x[:n][buf.task[:n] < task])
        x = torch.cat(xs)
        batches = (sc.preprocess(x[s : s + bs], train=False).to(strategy.device) for s in range(0, len(x), bs))
        return recalibrate_norm_statistics(self.model, batches)

    # ---------------------------------------------------------------- one step
    def _ranking(self, strategy: Strategy, ctx: StepContext) -> torch.Tensor:
        with torch.no_grad():
            out = strategy.model(ctx.x)
        ctx.extra["esacl_logits"] = out.detach()
        return F.cross_entropy(strategy.masked_logits(out, ctx.task), ctx.y, reduction="none")

    def select_batch(self, strategy: Strategy, ctx: StepContext) -> StepContext:
        ctx.extra["esacl_full"] = (ctx.x, ctx.x_raw, ctx.y, ctx.uid)
        sse = self.sse and self.cfg["esacl_sse_frac"] < 1
        ere = self.ere and self.cfg["esacl_ere_frac"] < 1
        losses = self._ranking(strategy, ctx) if (sse or ere) else None
        groups = ctx.y if self.cfg["esacl_rank"] == "per_class" else None
        idx_e = top_j(losses, self.cfg["esacl_ere_frac"], groups) if ere else None
        if self.sa:
            idx_s = top_j(losses, self.cfg["esacl_sse_frac"], groups) if sse else None
            self._perturb(strategy, ctx, idx_s)
        if idx_e is not None:
            ctx = _subset(ctx, idx_e)
        return ctx

    def _perturb(self, strategy: Strategy, ctx: StepContext, idx) -> None:
        """SAM's first pass on the support examples; leaves the model at θ + ε."""
        model = strategy.model
        x, y = (ctx.x, ctx.y) if idx is None else (ctx.x[idx], ctx.y[idx])
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        out = model(x)
        if idx is None:
            ctx.extra["esacl_logits"] = out.detach()
        loss = F.cross_entropy(strategy.masked_logits(out, ctx.task), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = self.shared.mask_grads(zip((n for n, _ in named), grads))  # frozen entries are not perturbed
        eps = sam_perturbation(grads, self.rho)
        saved = []
        with torch.no_grad():
            for p, e in zip(params, eps):
                if e is not None:
                    saved.append((p, p.detach().clone()))
                    p.add_(e)
        ctx.extra["esacl_saved"] = saved

    def after_backward(self, strategy: Strategy, ctx: StepContext) -> None:
        with torch.no_grad():
            for p, old in ctx.extra.pop("esacl_saved", []):
                p.copy_(old)  # back to θ exactly; the gradient stays the one taken at θ + ε
        self.shared.zero_grads()
        if not self.sp:
            return
        lr = float(self.cfg["lr"])
        for n, m in self.layers:
            w = m.weight
            g = w.grad
            if g is None:
                continue
            allowed = m.grad_mask
            n_tr = int(allowed.sum())
            if n_tr == 0:
                w.grad = None
                continue
            g = g.detach()
            mom = self.momentum.get(n)
            if mom is None:
                mom = self.momentum[n] = torch.zeros_like(w)
            if self.cfg["esacl_momentum_form"] == "sum":
                mom.add_(g)
            else:
                b = float(self.cfg["esacl_momentum"])
                mom.mul_(b).add_(g, alpha=1 - b)
            k = int(round(float(self.cfg["esacl_k"]) * n_tr))
            v = lmo_ksparse(mom, k, self.radius[n], allowed)
            if self.cfg["esacl_fw_step"] == "constant":
                eta = lr
            else:
                diff = float(((w.detach() - v) * allowed).norm())
                eta = lr * float(g.norm()) / diff if diff > 0 else 0.0
            if not math.isfinite(eta):
                raise ValueError(
                    f"lr: the Frank-Wolfe step of layer {n!r} is not finite (the run diverged at "
                    f"lr={lr}); expected a smaller lr or esacl_tau"
                )
            fw_step(w.data, v, min(max(eta, 0.0), 1.0), allowed)
            w.grad = None  # the optimizer leaves Frank-Wolfe layers alone

    def after_step(self, strategy: Strategy, ctx: StepContext) -> None:
        with torch.no_grad():
            for n, m in self.layers:
                vals = self.frozen_values.get(n)
                if vals is not None and vals.numel():
                    frozen = m.weight_mask & ~m.grad_mask
                    m.weight.data[frozen] = vals
            self.shared.restore()
        # the buffer gets the whole batch with its logits at θ (as DER++ stores them)
        x, x_raw, y, uid = ctx.extra.pop("esacl_full")
        logits = ctx.extra.pop("esacl_logits", None)
        if logits is not None:
            ctx.x, ctx.x_raw, ctx.y, ctx.uid, ctx.logits = x, x_raw, y, uid, logits

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        return {
            "momentum": {k: v.clone() for k, v in self.momentum.items()},
            "frozen_values": {k: v.clone() for k, v in self.frozen_values.items()},
            "budget": dict(self.budget),
            "radius": dict(self.radius),
            "init_rms": dict(self.init_rms),
            "shared": self.shared.state_dict(),
            "task": self.task,
        }

    def load_state_dict(self, state: dict) -> None:
        self.momentum = {k: v.clone() for k, v in state["momentum"].items()}
        self.frozen_values = {k: v.clone() for k, v in state["frozen_values"].items()}
        self.budget = dict(state["budget"])
        self.radius = dict(state["radius"])
        self.init_rms = dict(state.get("init_rms", self.init_rms))
        self.shared.load_state_dict(state.get("shared", {}))
        self.task = state["task"]


def _subset(ctx: StepContext, idx: torch.Tensor) -> StepContext:
    ctx.x, ctx.x_raw, ctx.y = ctx.x[idx], ctx.x_raw[idx.cpu()], ctx.y[idx]
    ctx.uid = ctx.uid[idx.cpu()]
    return ctx


@torch.no_grad()
def _fix_ewc(strategy: Strategy, layers) -> None:
    fisher, anchor = getattr(strategy, "fisher", None), getattr(strategy, "anchor", None)
    if fisher is None or anchor is None:
        return
    for n, m in layers:
        key = f"{n}.weight" if n else "weight"
        if key in anchor:
            anchor[key] = m.weight.detach().clone()
            fisher[key] = fisher[key] * m.weight_mask


def make_esacl_plugins(cfg: dict, model, scenario) -> list[Plugin]:
    """The EsaCL plugin of a run (registered as ``esacl_er``, ``esacl_derpp``, ``esacl_ewc`` in the registry)."""
    return [EsaCLPlugin(cfg, model, scenario.n_tasks)]
