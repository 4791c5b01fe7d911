"""DST: continual learning with dynamic sparse training (one sparse subnetwork per task).

Method ``dst`` = fine-tuning plus :class:`DSTPlugin`.  For each task ``t``:

1. **Sparse initialisation.**  Every sparse layer draws a fresh random mask ``M_t`` at the
   layer's density (``sparse_distribution``: ``uniform`` = ``1 - sparsity`` everywhere, ``erk`` =
   Erdős–Rényi–Kernel over the sparse layers, same total).  Positions of ``M_t`` that earlier
   tasks use are *reused*: read in the forward, never changed.  The others are the task's own
   weights; never-used ones start from a fresh default initialisation (``U(±1/√fan_in)``).  As
   written for the fresh mask per task and the reuse; the initial values are our reading (the
   code's note "free positions start at zero" read as: outside the mask), since a layer whose
   own weights all start at zero passes no gradient to the layers below.
2. **Topology updates** (as written: magnitude drop, cosine-annealed rate, the four growth
   strategies of the code and paper) every ``dst_update_every`` steps.  The code's interval is 100
   steps; the default (``null``) is ``ceil(steps per task / 10)``, at most 100: deviation, a task
   of 25 steps (ResNet-18 on the MNIST subset, 1 epoch) would never update at 100, so the default
   gives about ten updates per task and the code's 100 for tasks of 1000 steps or more.  At each
   update the ``k`` smallest-magnitude weights
   of the task's own set are dropped, with ``k = rate · |own|`` and ``rate`` cosine-annealed over
   the task from ``dst_drop_rate`` to ``dst_drop_rate_final``; then ``k`` connections are grown
   among the *free* positions (inactive, unused by earlier tasks, not just dropped) by

   - ``random``: uniformly;
   - ``unfired``: uniformly among positions never active so far (any task, any update); if
     fewer remain, fewer are dropped, so the count stays exact;
   - ``gradient``: largest ``|∂ℓ/∂w|`` (RigL); the dense weight gradient is computed only on
     update steps, from the layer's saved input and output gradient;
   - ``momentum``: largest Adam-style ``|m| / (√v + ε)`` of the dense gradient.  The sparse
     kernels never compute gradients of inactive weights, so this strategy computes the dense
     weight gradient at every step to keep its moments (it gives up the weight-gradient saving;
     the FLOP count shows it).

   Grown weights start at zero (and their optimizer state too).  The extra dense gradients are
   counted in the run's FLOPs under the part ``dense_grad``.
3. **Parameter isolation** (as written): the gradient mask of task ``t`` is its own set only, so
   the kernels skip the weight gradients of frozen weights (no zeroing after the fact).  At the
   end of the task ``M_t`` is stored and its weights join the frozen set.  Training uses the
   task's head slice (the multi-head loss is forced on: as written, the code's logit slices), and
   Task-IL evaluation of task ``j`` runs with task ``j``'s mask (:meth:`DSTPlugin.eval_task`; as
   written, except that the code takes the argmax over all logits, a defect not copied).  Class-IL
   figures of this method use that same task-``j`` network, i.e. they assume the task is known,
   and are not a Class-IL result.
   Everything that is not a sparse weight, ``dst_task_params``:

   - ``shared`` (default): one copy for all tasks.  BatchNorm layers (affine parameters and
     running statistics) are frozen after the first task: as written ("frozen batch
     normalization"), except that the running statistics are first set to the exact ones of the
     first task's network on its training data (one forward pass, counted in the FLOPs;
     deviation: the running averages of a short task still hold a fraction 0.9^steps of their
     initial values, 7 % after 25 steps, and frozen like that the first task's network, which
     all later tasks share the statistics of, was at chance in evaluation).  The other shared parameters (biases, dense layers such as the ResNet's
     stem) are frozen after the first task too: deviation, the paper's backbone has no dense
     parts outside BatchNorm and the head to say what to do; freezing them keeps the frozen
     weights' function exact.  Each task's head rows are frozen when the task ends.  The dense
     reference (``sparsity: 0``) shares the same parts and freezes BatchNorm the same way.
   - ``private`` (the earlier default): a copy per task of every such parameter and buffer
     (the BatchNorm statistics set to the task's exact ones first, as above), restored when the
     task is evaluated; deviation, kept as a variant, and its copies count in
     ``model_capacity``.

   ``model_capacity`` (eq. 6.24) adds to the current model and the stored masks every stored
   value outside them: earlier tasks' weights outside the current mask, and the private copies
   beyond one (:meth:`DSTPlugin.extra_capacity`).
4. **Adaptive growth** (the growth strategy is chosen at the start of each task; the paper's
   closing finding, not in its code):

   - ``adaptive_naive``: the paper's schedule (as written), ``random`` for the first
     ``floor(dst_naive_switch · T)`` tasks, ``gradient`` afterwards;
   - ``adaptive_capacity`` (ours, an extension): per layer, from the layer's free capacity at the start of the task
     (the fraction of its weights no earlier task uses): ``random`` while it is at least
     ``dst_capacity_threshold`` (room to explore), ``gradient`` once free weights are scarce and
     each grown connection has to count.  ERK gives layers different densities, so layers
     switch at different tasks, and at high sparsity the backbone stays free longer.

At ``sparsity = 0`` (for instance the dense reference of ``compare_dense``) there are no masks:
the method is a multi-head fine-tune of the same network (BatchNorm frozen after the first task).
``sparse_rescale`` has no effect on the sparse weights: every task draws its own weights fresh at
the default scale ``U(±1/√fan_in)`` (as the code does), so drop decisions compare like with like.  Weight decay is refused: it would
move frozen weights.  Per-layer backbone usage, the growth chosen per task and layer, and the
update counts are in ``results["method_report"]["dst"]``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

import sparsekern
from sparsekern.masks import erk_densities, random_mask, uniform_densities

from ..options import check_group, choice, fail, integer, number
from ..strategies import Plugin, StepContext, Strategy
from .isolation import (
    FrozenEntries,
    freeze_norm_statistics,
    head_rows,
    recalibrate_norm_statistics,
    shared_parameter_names,
)
from .masking import move_connections, pick

__all__ = [
    "DSTConfig",
    "DSTPlugin",
    "GROWTH",
    "FIXED_GROWTH",
    "task_densities",
    "cosine_drop_rate",
    "update_interval",
    "magnitude_drop",
    "choose_growth",
    "check_config",
    "make_dst_plugins",
]

FIXED_GROWTH = ("random", "unfired", "gradient", "momentum")
GROWTH = FIXED_GROWTH + ("adaptive_naive", "adaptive_capacity")
_NEEDS_GRAD = ("gradient", "momentum")


@dataclass(frozen=True)
class DSTConfig:
    """DST: per-task sparse subnetworks, topology updates and adaptive growth"""

    dst_growth: str = choice("random", f"DST growth strategy: {', '.join(GROWTH)}", GROWTH)
    dst_update_every: int | None = integer(
        None,
        "DST: topology update every this many steps within a task; null: ceil(steps per task / 10), at most 100",
        min=1,
        nullable=True,
    )
    dst_drop_rate: float = number(
        0.5, "DST: fraction of the task's own weights dropped at the first update (cosine-annealed)", "[0, 1]"
    )
    dst_drop_rate_final: float = number(0.005, "DST: drop fraction at the end of a task", "[0, 1]")
    dst_naive_switch: float = number(
        0.5, "DST adaptive_naive: fraction of the tasks grown randomly before switching to gradient", "[0, 1]"
    )
    dst_capacity_threshold: float = number(
        0.7, "DST adaptive_capacity: a layer grows randomly while this fraction of it is free", "[0, 1]"
    )
    dst_task_params: str = choice(
        "shared",
        "DST: parameters outside the sparse weights: shared (the paper: trained on the first task, then frozen "
        "with the BatchNorm statistics; the head trains each task's rows) or private (a copy per task, "
        "counted in the model capacity)",
        ("shared", "private"),
    )


def check_config(cfg: dict) -> None:
    """The DST keys of ``cfg``, and what DST needs of the core keys; ``ValueError`` naming the key."""
    check_group(DSTConfig, cfg)
    if cfg["sparsity"] > 0:
        if cfg["weight_decay"] != 0:
            fail(
                "weight_decay",
                "0 for method 'dst' (decay would change the frozen weights of earlier tasks)",
                cfg["weight_decay"],
            )
        if cfg["layout"] != "unstructured":
            fail("layout", "'unstructured' for method 'dst'", cfg["layout"])


# --------------------------------------------------------------------------- building blocks
def task_densities(shapes, sparsity: float, distribution: str) -> list[float]:
    """Per-layer density of a task's mask: ``uniform`` (``1 - sparsity`` each) or ``erk``.

    ERK gives layer ``l`` a density proportional to ``sum(shape_l) / prod(shape_l)`` (capped at 1),
    scaled so the kept fraction over all the layers is ``1 - sparsity``.
    """
    if distribution == "erk":
        return erk_densities(shapes, sparsity)
    if distribution == "uniform":
        return uniform_densities(shapes, sparsity)
    raise ValueError(f"sparse_distribution: expected 'uniform' or 'erk', got {distribution!r}")


def update_interval(every: int | None, steps_per_task: int) -> int:
    """Steps between topology updates: ``every``, or when ``None`` ``ceil(steps_per_task / 10)`` clamped to [1, 100]."""
    if every is not None:
        return int(every)
    return min(100, max(1, math.ceil(steps_per_task / 10)))


def cosine_drop_rate(step: int, total: int, start: float, end: float) -> float:
    """Drop fraction at ``step`` of ``total``: ``end + (start - end) (1 + cos(π step / total)) / 2``."""
    if total <= 0:
        return start
    frac = min(max(step / total, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * frac))


def magnitude_drop(weight: torch.Tensor, own: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Bool mask of the ``k`` smallest-``|w|`` positions of ``own`` (the weights a task may change)."""
    return pick(own, k, weight.detach().abs(), largest=False, generator=generator)


def choose_growth(
    candidates: torch.Tensor, k: int, scores: torch.Tensor | None, generator: torch.Generator
) -> torch.Tensor:
    """Bool mask of ``k`` positions among ``candidates``: largest ``scores``, or uniform when ``None``."""
    return pick(candidates, k, scores, largest=True, generator=generator)


# --------------------------------------------------------------------------- the plugin
class DSTPlugin(Plugin):
    """Per-task sparse subnetworks trained with dynamic sparse training (see the module docstring).

    Attributes (per sparse layer name): ``used`` (weights of finished tasks: frozen), ``fired``
    (positions ever active), ``masks`` (one dict of masks per finished task), ``task_states``
    (per finished task, every parameter and buffer that is not a sparse weight or mask).
    """

    name = "dst"

    def __init__(self, cfg: dict, model, scenario) -> None:
        self.cfg = cfg
        self.model = model
        self.scenario = scenario
        check_config(cfg)
        self.growth = cfg["dst_growth"]
        self.layers = dict(sparsekern.sparse_modules(model))
        names = list(self.layers)
        shapes = [tuple(self.layers[n].weight.shape) for n in names]
        dens = task_densities(shapes, cfg["sparsity"], cfg["sparse_distribution"]) if names else []
        self.densities = {n: min(float(d), 1.0) for n, d in zip(names, dens)}
        self.used = {n: torch.zeros_like(m.weight_mask) for n, m in self.layers.items()}
        self.fired = {n: torch.zeros_like(m.weight_mask) for n, m in self.layers.items()}
        self.masks: list[dict[str, torch.Tensor]] = []
        self.task_states: list[dict[str, torch.Tensor]] = []
        self.history: list[dict] = []
        self.task = -1
        self.task_step = 0
        self.total_steps = 0
        self.layer_growth: dict[str, str] = {}
        self.moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._captures: dict[str, list] = {}
        self._handles: list = []
        self._grads: dict[str, torch.Tensor] = {}
        self.private = cfg["dst_task_params"] == "private"
        self.shared = FrozenEntries(model)  # shared parameters frozen after the first task, head rows per task
        self.norm_frozen = False

    @property
    def reads_weight_grads(self) -> bool:
        """Growth takes its gradients from captured activations, and the frozen shared entries are
        biases, norms, dense layers and the head: only a sparse head's frozen rows need the dense
        ``weight.grad`` (to zero it before the step)."""
        return any(n == "head" or n.startswith("head.") for n in self.layers)

    # ------------------------------------------------------------------ configuration
    def _sparse_weight_keys(self) -> set[str]:
        keys = set()
        for n in self.layers:
            keys.update({f"{n}.weight", f"{n}.weight_mask", f"{n}.grad_mask"})
        return keys

    def _dense_state(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer that is not a sparse weight or mask (the task-specific part)."""
        skip = self._sparse_weight_keys()
        return {k: v for k, v in self.model.state_dict(keep_vars=True).items() if k not in skip}

    def _steps_per_task(self, strategy: Strategy, task: int) -> int:
        n = sum(len(self.scenario.train[i]) for i in strategy.training_tasks(task))
        return int(self.cfg["epochs"]) * math.ceil(n / int(self.cfg["batch_size"]))

    def _generator(self, *parts: int) -> torch.Generator:
        s = int(self.cfg["seed"])
        for p in parts:
            s = (s * 1_000_003 + int(p) + 1) % (2**62)
        return torch.Generator().manual_seed(s)

    def free_fraction(self, name: str | None = None) -> float:
        """Fraction of a layer's weights (or of all sparse weights) no finished task uses."""
        names = [name] if name is not None else list(self.layers)
        total = sum(self.used[n].numel() for n in names)
        return 1.0 - sum(int(self.used[n].sum()) for n in names) / max(total, 1)

    def growth_for(self, name: str, task: int) -> str:
        """The growth strategy of layer ``name`` during ``task`` (fixed, or chosen by the adaptive rule)."""
        g = self.growth
        if g == "adaptive_naive":
            return "random" if task < int(self.cfg["dst_naive_switch"] * self.scenario.n_tasks) else "gradient"
        if g == "adaptive_capacity":
            return "random" if self.free_fraction(name) >= self.cfg["dst_capacity_threshold"] else "gradient"
        return g

    # ------------------------------------------------------------------ hooks
    @torch.no_grad()
    def begin_task(self, strategy: Strategy, task: int) -> None:
        strategy.multihead = True  # train the task's own head, which is what Task-IL evaluates
        if not self.layers:
            return
        self.task = task
        self.task_step = 0
        self.total_steps = self._steps_per_task(strategy, task)
        self.layer_growth = {n: self.growth_for(n, task) for n in self.layers}
        self.moments = {}
        self.history.append(
            {
                "task": task,
                "growth": dict(self.layer_growth),
                "free_fraction_at_start": self.free_fraction(),
                "free_fraction_per_layer": {n: self.free_fraction(n) for n in self.layers},
                "steps": self.total_steps,
                "update_every": self.update_every(),
                "updates": 0,
                "moved": {n: 0 for n in self.layers},
            }
        )
        for i, (name, layer) in enumerate(self.layers.items()):
            w = layer.weight
            used = self.used[name]
            d = self.densities[name]
            mask = random_mask(tuple(w.shape), max(0.0, 1.0 - d), generator=self._generator(task, i, 0)).to(w.device)
            own = mask & ~used
            bound = 1.0 / math.sqrt(w[0].numel())  # nn.Linear / nn.Conv2d default init bound
            fresh = (torch.rand(tuple(w.shape), generator=self._generator(task, i, 1)) * 2 - 1) * bound
            w.copy_(torch.where(own, fresh.to(w.device, w.dtype), torch.where(used, w, torch.zeros_like(w))))
            layer.set_mask(mask, grad_mask=own, zero_pruned=False)
            self.fired[name] |= mask

    def select_batch(self, strategy: Strategy, ctx: StepContext) -> StepContext:
        strategy.multihead = True  # also after resuming in the middle of a task
        if self.norm_frozen:
            freeze_norm_statistics(self.model)
        if not self.layers:
            return ctx
        update_next = self._update_due(self.task_step + 1)
        want = [n for n, g in self.layer_growth.items() if g == "momentum" or (g == "gradient" and update_next)]
        if want:
            self._capture(want, getattr(strategy, "flop_counter", None))
        return ctx

    def after_backward(self, strategy: Strategy, ctx: StepContext) -> None:
        self.shared.zero_grads()
        if not self._handles:
            return
        self._release()
        grads = self._dense_grads(strategy)
        for name, g in grads.items():
            if self.layer_growth[name] == "momentum":
                b1, b2, eps = self._adam_constants(strategy)
                m, v = self.moments.get(name, (torch.zeros_like(g), torch.zeros_like(g)))
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                self.moments[name] = (m, v)
            else:
                self._grads[name] = g

    def after_step(self, strategy: Strategy, ctx: StepContext) -> None:
        self.shared.restore()
        if not self.layers:
            return
        self.task_step += 1
        if self._update_due(self.task_step):
            self.update_topology(strategy)
        self._grads = {}

    @torch.no_grad()
    def end_task(self, strategy: Strategy, task: int) -> None:
        if self.private or not self.norm_frozen:  # the statistics this task's network keeps
            self.recalibrate_norms(strategy, task)
        if not self.private:
            self.norm_frozen = True  # BatchNorm frozen after the first task, dense reference included
        if not self.layers:
            return
        if not self.private:
            if task == 0:
                for name in shared_parameter_names(self.model, self.layers):
                    self.shared.freeze(name)
            lo, hi = self.scenario.task_classes(task)
            for name, rows in head_rows(self.model, lo, hi).items():
                self.shared.freeze(name, rows)
        self._release()
        masks = {}
        for name, layer in self.layers.items():
            masks[name] = layer.weight_mask.clone()
            self.used[name] |= layer.weight_mask
            layer.set_grad_mask(torch.zeros_like(layer.grad_mask))
        self.masks.append(masks)
        if self.private:
            self.task_states.append({k: v.detach().clone() for k, v in self._dense_state().items()})
        h = self.history[-1]
        h["usage_per_layer"] = {n: float(self.used[n].float().mean()) for n in self.layers}
        h["usage"] = 1.0 - self.free_fraction()
        h["own_weights"] = {n: int((masks[n] & ~self._used_before(n)).sum()) for n in self.layers}
        h["reused_weights"] = {n: int((masks[n] & self._used_before(n)).sum()) for n in self.layers}
        self.moments = {}

    def recalibrate_norms(self, strategy: Strategy, task: int) -> bool:
        """BatchNorm running statistics := the exact statistics of ``task``'s training data under the
        current network (one forward pass, counted in the FLOPs), before they are frozen or stored."""
        data = [self.scenario.train[i] for i in strategy.training_tasks(task)]
        bs = int(self.cfg["eval_batch_size"])
        batches = (
            self.scenario.preprocess(d.x[s : s + bs], train=False).to(strategy.device)
            for d in data
            for s in range(0, len(d), bs)
        )
        return recalibrate_norm_statistics(self.model, batches)

    def _used_before(self, name: str) -> torch.Tensor:
        prev = torch.zeros_like(self.used[name])
        for m in self.masks[:-1]:
            prev |= m[name]
        return prev

    # ------------------------------------------------------------------ topology updates
    def update_every(self) -> int:
        """Steps between topology updates in the current task (``dst_update_every``, or its default)."""
        return update_interval(self.cfg["dst_update_every"], self.total_steps)

    def _update_due(self, step: int) -> bool:
        return step % self.update_every() == 0 and step < self.total_steps

    @torch.no_grad()
    def update_topology(self, strategy: Strategy | None = None) -> dict[str, int]:
        """Drop and regrow in every sparse layer now; returns the number moved per layer."""
        rate = cosine_drop_rate(
            self.task_step, self.total_steps, self.cfg["dst_drop_rate"], self.cfg["dst_drop_rate_final"]
        )
        moved = {}
        for i, (name, layer) in enumerate(self.layers.items()):
            growth = self.layer_growth.get(name, "random")
            scores = None
            if growth == "gradient":
                g = self._grads.get(name)
                scores = None if g is None else g.abs()
            elif growth == "momentum" and name in self.moments:
                m, v = self.moments[name]
                _, _, eps = self._adam_constants(strategy)
                scores = m.abs() / (v.sqrt() + eps)
            gen = self._generator(self.task, i, 2, self.task_step)
            moved[name] = self.drop_and_grow(layer, name, rate, growth, scores, gen, strategy)
        if self.history:
            self.history[-1]["updates"] += 1
            for n, k in moved.items():
                self.history[-1]["moved"][n] += k
        return moved

    @torch.no_grad()
    def drop_and_grow(self, layer, name: str, rate: float, growth: str, scores, generator, strategy=None) -> int:
        """One drop/grow of ``layer``: the same number dropped (smallest |w| of the task's own
        weights) and grown (free positions, by ``growth``); grown weights start at zero."""
        mask, own = layer.weight_mask, layer.grad_mask
        candidates = ~mask & ~self.used[name]
        if growth == "unfired":
            candidates = candidates & ~self.fired[name]
        k = min(int(round(rate * int(own.sum()))), int(candidates.sum()))
        if k <= 0:
            return 0
        drop = magnitude_drop(layer.weight, own, k, generator)
        grow = choose_growth(candidates, k, None if growth in ("random", "unfired") else scores, generator)
        # other tasks' weights outside the mask keep their values (zero_pruned=False)
        move_connections(
            layer,
            drop,
            grow,
            optimizer=getattr(strategy, "optimizer", None),
            grad_mask=(own & ~drop) | grow,
            zero_pruned=False,
        )
        self.fired[name] |= grow
        return k

    @staticmethod
    def _adam_constants(strategy) -> tuple[float, float, float]:
        opt = getattr(strategy, "optimizer", None)
        if isinstance(opt, torch.optim.Adam):
            b1, b2 = opt.param_groups[0]["betas"]
            return float(b1), float(b2), float(opt.param_groups[0]["eps"])
        return 0.9, 0.999, 1e-8

    # ------------------------------------------------------------------ dense gradients
    def _capture(self, names: list[str], counter=None) -> None:
        for name in names:
            layer = self.layers[name]
            self._captures[name] = []

            def hook(module, inputs, output, name=name):
                if not torch.is_grad_enabled() or not output.requires_grad:
                    return
                # a data-parallel shard's rows stand for row_scale times as many (for the FLOPs)
                entry = [inputs[0].detach(), None, 1.0 if counter is None else counter.row_scale]
                self._captures[name].append(entry)

                def on_grad(grad, entry=entry):
                    entry[1] = grad.detach()

                output.register_hook(on_grad)

            self._handles.append(layer.register_forward_hook(hook))

    def _release(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _dense_grads(self, strategy) -> dict[str, torch.Tensor]:
        """``∂ℓ/∂W`` over every position, from the inputs and output gradients saved this step."""
        out = {}
        counter = getattr(strategy, "flop_counter", None)
        for name, entries in self._captures.items():
            layer = self.layers[name]
            g = torch.zeros_like(layer.weight)
            for x, dy, scale in entries:
                if dy is None:
                    continue
                if layer.weight.dim() == 2:
                    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
                    g += dy2.t() @ x2
                    macs = x2.shape[0] * x2.shape[1] * dy2.shape[1] * scale
                else:
                    g += torch.nn.grad.conv2d_weight(
                        x, tuple(layer.weight.shape), dy, layer.stride, layer.padding, layer.dilation, layer.groups
                    )
                    macs = dy.numel() * layer.weight[0].numel() * scale
                if counter is not None:
                    counter.add(name, "dense_grad", 2.0 * macs, 0.0)
            out[name] = g
        self._captures = {}
        strategy.sum_over_ranks_(list(out.values()))  # a data-parallel rank saw its shard's rows
        return out

    # ------------------------------------------------------------------ evaluation
    def eval_task(self, strategy: Strategy, task: int):
        """Context that runs the model as task ``task``'s network (its mask and stored parameters)."""
        if not self.layers or task >= len(self.masks):
            return None
        return self._as_task(task)

    @contextlib.contextmanager
    def _as_task(self, task: int):
        saved_masks = {n: (m.weight_mask.clone(), m.grad_mask.clone()) for n, m in self.layers.items()}
        dense = self._dense_state() if self.private else {}
        saved_dense = {k: v.detach().clone() for k, v in dense.items()}
        try:
            with torch.no_grad():
                for name, layer in self.layers.items():
                    mask = self.masks[task][name]
                    layer.set_mask(mask, grad_mask=torch.zeros_like(mask), zero_pruned=False)
                for k, v in (self.task_states[task] if self.private else {}).items():
                    dense[k].copy_(v)
            yield
        finally:
            with torch.no_grad():
                for name, layer in self.layers.items():
                    wm, gm = saved_masks[name]
                    layer.set_mask(wm, grad_mask=gm, zero_pruned=False)
                for k, v in saved_dense.items():
                    dense[k].copy_(v)

    # ------------------------------------------------------------------ bookkeeping
    def n_stored_masks(self, strategy: Strategy) -> int | None:
        return len(self.masks) if self.layers else None

    def extra_capacity(self, strategy: Strategy) -> float | None:
        """Stored values beyond the current model, as a fraction of the linear/conv weights (eq. 6.24's unit):
        weights of earlier tasks outside the current mask, and with ``private`` the per-task copies
        of every other parameter and buffer beyond one."""
        if not self.layers:
            return None
        total = sum(m.weight.numel() for m in self.model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
        stored = sum(int((self.used[n] & ~m.weight_mask).sum()) for n, m in self.layers.items())
        if self.private and self.task_states:
            per_task = sum(v.numel() for v in self.task_states[0].values())
            stored += (len(self.task_states) - 1) * per_task
        return stored / max(total, 1)

    def report(self, strategy: Strategy) -> dict | None:
        if not self.layers:
            return {"sparse_layers": []}
        return {
            "sparse_layers": list(self.layers),
            "growth": self.growth,
            "densities": dict(self.densities),
            "tasks": self.history,
            "usage_per_layer": {n: float(self.used[n].float().mean()) for n in self.layers},
            "usage": 1.0 - self.free_fraction(),
        }

    def state_dict(self) -> dict:
        return {
            "used": self.used,
            "fired": self.fired,
            "masks": self.masks,
            "task_states": self.task_states,
            "history": self.history,
            "task": self.task,
            "task_step": self.task_step,
            "total_steps": self.total_steps,
            "layer_growth": self.layer_growth,
            "moments": self.moments,
            "shared": self.shared.state_dict(),
            "norm_frozen": self.norm_frozen,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in (
            "used",
            "fired",
            "masks",
            "task_states",
            "history",
            "task",
            "task_step",
            "total_steps",
            "layer_growth",
            "moments",
        ):
            setattr(self, key, state[key])
        self.shared.load_state_dict(state.get("shared", {}))
        self.norm_frozen = bool(state.get("norm_frozen", False))


def make_dst_plugins(cfg: dict, model, scenario) -> list[Plugin]:
    """The DST plugin of a run (registered as method ``dst`` in :mod:`sparsekern_cl.registry`)."""
    return [DSTPlugin(cfg, model, scenario)]
