"""Strategies (fine-tune, joint, ER, DER++, online EWC) and the hooks sparse methods plug into.

A training step (:meth:`Strategy.observe`) runs in this order, each line a place to extend::

    ctx = StepContext(x, x_raw, y, task, uid, step)
    for p in plugins: ctx = p.select_batch(strategy, ctx)   # in-batch example selection
    strategy.prepare(ctx)                                   # draw replay samples once per step
    loss = strategy.loss(ctx)                               # deterministic given ctx
    loss.backward()                                         # (+ the gradients' all-reduce when data-parallel)
    for p in plugins: p.after_backward(strategy, ctx)       # SAM's second pass, gradient masks
    optimizer.step()
    for p in plugins: p.after_step(strategy, ctx)           # per-example statistics (ctx.logits)
    strategy.after_step(ctx)                                # buffer insertion

Around the steps the runner calls ``begin_task``, ``train_indices`` (which examples of the task
an epoch visits: data removal), ``end_epoch`` (mask updates every few epochs) and ``end_task``
(pruning, freezing, Fisher information), on the strategy and then on each plugin.  Because
``loss(ctx)`` reuses the replay samples drawn in ``prepare``, a plugin can call it again for an
extra forward/backward pass.  Training forwards go through :meth:`Strategy.forward`, which a
data-parallel run (:mod:`sparsekern_cl.parallel`) spreads over the ranks.  Masks and gradient masks are changed through
:meth:`Strategy.sparse_layers` and the layers' ``set_mask`` / ``set_grad_mask``.

The strategies' own keys are declared here as configuration groups (:class:`ReplayConfig`,
:class:`DERPPConfig`, :class:`EWCConfig`); which method uses which is in :mod:`sparsekern_cl.registry`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import sparsekern

from .buffer import ReservoirBuffer
from .options import flag, integer, number

__all__ = [
    "STRATEGIES",  # noqa: F822 (the registry's view, served by the module's __getattr__)
    "ReplayConfig",
    "DERPPConfig",
    "EWCConfig",
    "StepContext",
    "Plugin",
    "Strategy",
    "FineTune",
    "Joint",
    "ER",
    "DERPP",
    "EWCOnline",
    "make_strategy",
]


@dataclass(frozen=True)
class ReplayConfig:
    """replay buffer"""

    buffer_size: int = integer(200, "replay buffer capacity (er, derpp)", min=0)
    minibatch_size: int | None = integer(None, "replay batch size (default: batch_size)", min=1, nullable=True)
    mask_current_logits: bool = flag(
        False,
        "the current batch's cross-entropy sees only the current task's logits (others masked; "
        "SparCL's official code); replayed examples keep every logit",
    )


@dataclass(frozen=True)
class DERPPConfig:
    """DER++: weights of the replay terms"""

    alpha: float = number(0.3, "DER++ weight of the logit-matching term", "[0, inf]")
    beta: float = number(0.5, "DER++ weight of the replayed cross-entropy", "[0, inf]")


@dataclass(frozen=True)
class EWCConfig:
    """online EWC"""

    ewc_lambda: float = number(10.0, "EWC penalty strength", "[0, inf]")
    ewc_gamma: float = number(1.0, "online-EWC decay of the running Fisher", "[0, 1]")
    ewc_fisher_samples: int = integer(0, "examples used for the Fisher estimate (0: all of the task)", min=0)


@dataclass
class StepContext:
    """Everything one training step works on.

    Attributes:
        x: preprocessed (augmented) inputs of the current batch; x_raw: the raw inputs.
        y: labels; task: the task being trained; uid: stable example ids (see ``TaskData``).
        step: global step counter (0-based, over the whole run).
        extra: replay samples and anything a strategy or plugin wants to share within the step.
        logits: the current batch's logits from the last ``loss`` call (detached).
        loss: the last loss value.
    """

    x: torch.Tensor
    x_raw: torch.Tensor
    y: torch.Tensor
    task: int
    uid: torch.Tensor
    step: int
    extra: dict = field(default_factory=dict)
    logits: torch.Tensor | None = None
    loss: float | None = None


class Plugin:
    """Extension point for sparse methods; every hook defaults to doing nothing.

    ``n_stored_masks(strategy)`` says how many task masks the method keeps (for model capacity);
    ``extra_capacity(strategy)`` what else it stores (per-task parameters, weights outside the
    current mask), as a fraction of the model's linear/conv weights.
    ``eval_task(strategy, task)`` may return a context manager inside which task ``task`` is
    evaluated (methods with per-task masks or heads switch to them there); ``report(strategy)``
    may return a JSON-able dict stored in the results under the plugin's ``name``.
    """

    name = "plugin"
    #: whether a hook reads ``weight.grad`` of sparse layers (then they keep the dense gradient
    #: layout; see ``compact_grads``)
    reads_weight_grads = True

    def begin_task(self, strategy: Strategy, task: int) -> None: ...
    def train_indices(self, strategy: Strategy, task: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
        return indices

    def select_batch(self, strategy: Strategy, ctx: StepContext) -> StepContext:
        return ctx

    def after_backward(self, strategy: Strategy, ctx: StepContext) -> None: ...
    def after_step(self, strategy: Strategy, ctx: StepContext) -> None: ...
    def end_epoch(self, strategy: Strategy, task: int, epoch: int) -> None: ...
    def end_task(self, strategy: Strategy, task: int) -> None: ...
    def n_stored_masks(self, strategy: Strategy) -> int | None:
        return None

    def extra_capacity(self, strategy: Strategy) -> float | None:
        return None

    def eval_task(self, strategy: Strategy, task: int) -> contextlib.AbstractContextManager | None:
        return None

    def report(self, strategy: Strategy) -> dict | None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


class Strategy:
    """Fine-tuning: plain SGD on the current task (the lower bound); base of the other strategies.

    Args:
        model: the backbone (dense or sparse).
        scenario: the :class:`~sparsekern_cl.data.Scenario`.
        cfg: the validated run configuration (``lr``, ``optimizer``, ``momentum``, ``weight_decay``,
            ``head``, ``seed`` and the strategy's own keys).
        device: where the model lives.
        plugins: :class:`Plugin` objects run at each hook, in order.
    """

    name = "finetune"
    uses_buffer = False

    def __init__(self, model: nn.Module, scenario, cfg: dict, device: torch.device, plugins=()) -> None:
        self.model = model
        self.scenario = scenario
        self.cfg = cfg
        self.device = device
        self.plugins: list[Plugin] = list(plugins)
        self.optimizer: torch.optim.Optimizer | None = None
        self.global_step = 0
        self.aug_generator = torch.Generator().manual_seed(int(cfg["seed"]) * 7919 + 1)
        self.multihead = cfg.get("head", "single") == "multi"
        self.flop_counter = None  # the run's FlopCounter (set by the runner), for FLOPs a plugin adds itself
        self.layer_runs: list[dict] = []  # per task end, what each sparse layer last ran on
        self.parallel = None  # the run's sparsekern_cl.parallel.DataParallel (set by the runner), or None

    # ---------------------------------------------------------------- helpers
    def make_optimizer(self) -> torch.optim.Optimizer:
        """SGD or Adam; with ``sparse_optimizer`` (default) and sparse layers in the model, the
        :mod:`sparsekern.optim` variant, whose step touches only each sparse weight's gradient mask
        (bit-identical to torch.optim while the masks are fixed and weight_decay is 0)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        c = self.cfg
        sparse = c.get("sparse_optimizer", True) and bool(sparsekern.sparse_modules(self.model))
        kw = {"model": self.model, "grad_layout": self.grad_layout()} if sparse else {}
        if c["optimizer"] == "sgd":
            cls = sparsekern.optim.SGD if sparse else torch.optim.SGD
            return cls(params, lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"], **kw)
        cls = sparsekern.optim.Adam if sparse else torch.optim.Adam
        return cls(params, lr=c["lr"], weight_decay=c["weight_decay"], **kw)

    #: whether the strategy itself reads ``weight.grad`` of sparse layers
    reads_weight_grads = False

    def grad_layout(self) -> str:
        """``"compact"`` (the sparse layers' backward writes ``dW`` on ``G`` only, see
        ``SparseLinear.set_grad_layout``) when ``compact_grads`` is on, neither the strategy nor
        a plugin reads ``weight.grad`` and the run is not data-parallel; else ``"dense"``."""
        readers = [self.reads_weight_grads] + [p.reads_weight_grads for p in self.plugins]
        # data-parallel: the gradient all-reduce (sparsekern.distributed) sends weight.grad
        dist = torch.distributed
        parallel = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        return "compact" if self.cfg.get("compact_grads", True) and not any(readers) and not parallel else "dense"

    def sparse_layers(self) -> list[tuple[str, nn.Module]]:
        """``(name, layer)`` of every sparse layer: where masks and gradient masks are changed."""
        return sparsekern.sparse_modules(self.model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output for a training batch (in a data-parallel run: this rank's rows, gathered)."""
        if self.parallel is None:
            return self.model(x)
        return self.parallel.forward(self.model, x, self.flop_counter)

    def sum_over_ranks_(self, tensors: list[torch.Tensor]) -> None:
        """Sum per-rank partial results (e.g. gradients a plugin computes from a step's shards) in place;
        nothing to do in one process."""
        if self.parallel is not None:
            self.parallel.sum_(tensors)

    def transform(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Training view of raw inputs (augmented with the strategy's generator)."""
        return self.scenario.preprocess(x_raw, train=True, generator=self.aug_generator).to(self.device)

    def masked_logits(self, logits: torch.Tensor, tasks: torch.Tensor | int) -> torch.Tensor:
        """In multi-head mode, logits outside each example's task set to a large negative value."""
        if not self.multihead:
            return logits
        return self._task_logits(logits, tasks)

    def current_logits(self, logits: torch.Tensor, task: int) -> torch.Tensor:
        """Logits of the current batch for its loss: task-masked in multi-head mode or with ``mask_current_logits``."""
        if self.multihead or self.cfg.get("mask_current_logits", False):
            return self._task_logits(logits, task)
        return logits

    def _task_logits(self, logits: torch.Tensor, tasks: torch.Tensor | int) -> torch.Tensor:
        k = self.scenario.classes_per_task
        if isinstance(tasks, int):
            tasks = torch.full((logits.shape[0],), tasks, dtype=torch.long)
        cls = torch.arange(logits.shape[1], device=logits.device)
        lo = (tasks.to(logits.device) * k).unsqueeze(1)
        keep = (cls >= lo) & (cls < lo + k)
        return logits.masked_fill(~keep, -1e9)

    # ---------------------------------------------------------------- hooks
    def begin_task(self, task: int) -> None:
        """Called before a task's first epoch; builds a fresh optimizer."""
        self.optimizer = self.make_optimizer()
        for p in self.plugins:
            p.begin_task(self, task)

    def training_tasks(self, task: int) -> list[int]:
        """Tasks whose training data is used while learning ``task`` (joint: all seen so far)."""
        return [task]

    def train_indices(self, task: int, epoch: int, n: int) -> torch.Tensor:
        """Positions (into the task's training data) this epoch visits; plugins may remove some."""
        idx = torch.arange(n)
        for p in self.plugins:
            idx = p.train_indices(self, task, epoch, idx)
        return idx

    def prepare(self, ctx: StepContext) -> None:
        """Draw whatever the loss needs besides the batch (replay samples); once per step."""

    def loss(self, ctx: StepContext) -> torch.Tensor:
        """The step's loss; also stores the current batch's detached logits in ``ctx.logits``."""
        out = self.forward(ctx.x)
        ctx.logits = out.detach()
        return F.cross_entropy(self.current_logits(out, ctx.task), ctx.y)

    def after_step(self, ctx: StepContext) -> None:
        """After the optimizer step (replay strategies insert into the buffer here)."""

    def observe(self, x: torch.Tensor, x_raw: torch.Tensor, y: torch.Tensor, task: int, uid: torch.Tensor) -> float:
        """One training step on a batch; returns the loss."""
        ctx = StepContext(x=x, x_raw=x_raw, y=y, task=task, uid=uid, step=self.global_step)
        for p in self.plugins:
            ctx = p.select_batch(self, ctx)
        self.prepare(ctx)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(ctx)
        loss.backward()
        if self.parallel is not None:
            self.parallel.sync_grads(self.model)
        ctx.loss = float(loss.detach())
        for p in self.plugins:
            p.after_backward(self, ctx)
        self.optimizer.step()
        for p in self.plugins:
            p.after_step(self, ctx)
        self.after_step(ctx)
        self.global_step += 1
        return ctx.loss

    def end_epoch(self, task: int, epoch: int) -> None:
        for p in self.plugins:
            p.end_epoch(self, task, epoch)

    def end_task(self, task: int) -> None:
        for p in self.plugins:
            p.end_task(self, task)

    def note_layer_runs(self) -> None:
        """Record what each sparse layer's last call ran on (the runner calls it when a task's training ends)."""
        from .provenance import layer_runs

        self.layer_runs.append(layer_runs(self.model))

    def eval_task(self, task: int) -> contextlib.AbstractContextManager:
        """Context in which task ``task`` is evaluated: the plugins' ``eval_task`` contexts, entered in order."""
        stack = contextlib.ExitStack()
        with stack:
            for p in self.plugins:
                cm = p.eval_task(self, task)
                if cm is not None:
                    stack.enter_context(cm)
            return stack.pop_all()

    # ---------------------------------------------------------------- bookkeeping
    def forward_rows_per_example(self) -> int:
        """Forward rows per current-batch example in one step (for the activation footprint)."""
        return 1

    def n_stored_masks(self) -> int:
        """Task masks the method keeps: 0 dense, 1 for one shared mask, unless a plugin says more."""
        for p in self.plugins:
            n = p.n_stored_masks(self)
            if n is not None:
                return n
        return 1 if self.sparse_layers() else 0

    def extra_capacity(self) -> float:
        """Stored values beyond the model and its masks, as a fraction of its linear/conv weights (plugins')."""
        return sum(p.extra_capacity(self) or 0.0 for p in self.plugins)

    def method_report(self) -> dict:
        """``{plugin name: report}`` of the plugins that report something (see :class:`Plugin`)."""
        out = {}
        for p in self.plugins:
            r = p.report(self)
            if r is not None:
                out[p.name] = r
        return out

    def state_dict(self) -> dict:
        return {
            "global_step": self.global_step,
            "aug_generator": self.aug_generator.get_state(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "plugins": [p.state_dict() for p in self.plugins],
            "layer_runs": list(self.layer_runs),
        }

    def load_state_dict(self, state: dict) -> None:
        self.global_step = state["global_step"]
        self.aug_generator.set_state(state["aug_generator"])
        if state["optimizer"] is not None:
            if self.optimizer is None:
                self.optimizer = self.make_optimizer()
            self.optimizer.load_state_dict(state["optimizer"])
        for p, s in zip(self.plugins, state["plugins"]):
            p.load_state_dict(s)
        self.layer_runs = list(state.get("layer_runs", []))


FineTune = Strategy


class Joint(Strategy):
    """Joint training (the upper bound): while learning task ``t``, train on the data of tasks ``0..t``."""

    name = "joint"

    def training_tasks(self, task: int) -> list[int]:
        return list(range(task + 1))

    def loss(self, ctx: StepContext) -> torch.Tensor:
        out = self.forward(ctx.x)
        ctx.logits = out.detach()
        tasks = self.scenario.label_task(ctx.y)
        return F.cross_entropy(self.masked_logits(out, tasks), ctx.y)


class _Replay(Strategy):
    uses_buffer = True

    def __init__(self, model, scenario, cfg, device, plugins=()) -> None:
        super().__init__(model, scenario, cfg, device, plugins)
        self.buffer = ReservoirBuffer(int(cfg["buffer_size"]), seed=int(cfg["seed"]) * 104729 + 3)
        self.minibatch = int(cfg.get("minibatch_size") or cfg["batch_size"])

    def draw(self, ctx: StepContext, key: str) -> None:
        if self.buffer.is_empty():
            ctx.extra[key] = None
            return
        xb, yb, lb, tb = self.buffer.sample(self.minibatch)
        ctx.extra[key] = (self.transform(xb), yb.to(self.device), None if lb is None else lb.to(self.device), tb)

    def state_dict(self) -> dict:
        s = super().state_dict()
        s["buffer"] = self.buffer.state_dict()
        return s

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer.load_state_dict(state["buffer"])


class ER(_Replay):
    """Experience replay: each step trains on the batch concatenated with a reservoir-buffer sample."""

    name = "er"

    def prepare(self, ctx: StepContext) -> None:
        self.draw(ctx, "replay")

    def loss(self, ctx: StepContext) -> torch.Tensor:
        rep = ctx.extra.get("replay")
        n = ctx.x.shape[0]
        if rep is None:
            return super().loss(ctx)
        xb, yb, _, tb = rep
        out = self.forward(torch.cat([ctx.x, xb]))
        ctx.logits = out[:n].detach()
        logits = torch.cat([self.current_logits(out[:n], ctx.task), self.masked_logits(out[n:], tb)])
        return F.cross_entropy(logits, torch.cat([ctx.y, yb]))

    def after_step(self, ctx: StepContext) -> None:
        self.buffer.add(ctx.x_raw, ctx.y, task=ctx.task)

    def forward_rows_per_example(self) -> int:
        return 2


class DERPP(_Replay):
    """DER++: CE on the batch + ``alpha`` * MSE to stored logits + ``beta`` * CE on stored labels.

    The two replay terms use two independent buffer samples; stored logits are those of the
    training forward when the example was inserted (no extra pass).  A backbone whose output for
    an example does not depend on the rest of its batch (no batch norm, no dropout) runs the
    current batch and both replay samples as one forward pass: the same function and gradients
    (up to the order of floating-point sums), a third of the per-call costs, larger batches for
    the kernels.  Other backbones (batch norm in training mode) keep three passes, as the
    reference implementation does.
    """

    name = "derpp"

    def prepare(self, ctx: StepContext) -> None:
        self.draw(ctx, "replay_logits")
        self.draw(ctx, "replay_labels")

    def _one_pass(self) -> bool:
        if not hasattr(self, "_one_pass_ok"):
            batch_dependent = (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)
            self._one_pass_ok = not any(isinstance(m, batch_dependent) for m in self.model.modules())
        return self._one_pass_ok

    def loss(self, ctx: StepContext) -> torch.Tensor:
        a, b = self.cfg["alpha"], self.cfg["beta"]
        rl = ctx.extra.get("replay_logits") if a else None
        rb = ctx.extra.get("replay_labels") if b else None
        if (rl is not None or rb is not None) and self._one_pass():
            parts = [ctx.x] + [r[0] for r in (rl, rb) if r is not None]
            outs = self.forward(torch.cat(parts)).split([p.shape[0] for p in parts])
            ctx.logits = outs[0].detach()
            loss = F.cross_entropy(self.masked_logits(outs[0], ctx.task), ctx.y)
            if rl is not None:
                loss = loss + a * F.mse_loss(outs[1], rl[2])
            if rb is not None:
                loss = loss + b * F.cross_entropy(self.masked_logits(outs[-1], rb[3]), rb[1])
            return loss
        loss = super().loss(ctx)
        rep = ctx.extra.get("replay_logits")
        if rep is not None and a:
            xb, _, lb, _ = rep
            loss = loss + a * F.mse_loss(self.forward(xb), lb)
        rep = ctx.extra.get("replay_labels")
        if rep is not None and b:
            xb, yb, _, tb = rep
            loss = loss + b * F.cross_entropy(self.masked_logits(self.forward(xb), tb), yb)
        return loss

    def after_step(self, ctx: StepContext) -> None:
        self.buffer.add(ctx.x_raw, ctx.y, logits=ctx.logits, task=ctx.task)

    def forward_rows_per_example(self) -> int:
        return 3


class EWCOnline(Strategy):
    """Online EWC: ``CE + lambda/2 * sum F (w - w*)^2`` with a running Fisher ``F <- gamma F + F_t``.

    At each task end the diagonal Fisher of the task's training data is estimated from
    per-example gradients of the log-likelihood of the true label (``ewc_fisher_samples``
    examples, 0 = all) and ``w*`` is set to the current weights.
    """

    name = "ewc"
    reads_weight_grads = True  # the Fisher estimate

    def __init__(self, model, scenario, cfg, device, plugins=()) -> None:
        super().__init__(model, scenario, cfg, device, plugins)
        self.fisher: dict[str, torch.Tensor] | None = None
        self.anchor: dict[str, torch.Tensor] | None = None
        self.current_task_data = None

    def penalty(self) -> torch.Tensor:
        if self.fisher is None:
            return torch.zeros((), device=self.device)
        total = torch.zeros((), device=self.device)
        for name, p in self.model.named_parameters():
            if name in self.fisher:
                total = total + (self.fisher[name] * (p - self.anchor[name]) ** 2).sum()
        return total

    def loss(self, ctx: StepContext) -> torch.Tensor:
        loss = super().loss(ctx)
        if self.fisher is not None:
            loss = loss + 0.5 * self.cfg["ewc_lambda"] * self.penalty()
        return loss

    def end_task(self, task: int) -> None:
        data = self.scenario.train[task]
        n = len(data)
        m = int(self.cfg["ewc_fisher_samples"]) or n
        g = torch.Generator().manual_seed(int(self.cfg["seed"]) * 31 + task)
        sel = torch.randperm(n, generator=g)[: min(m, n)]
        params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        fish = {name: torch.zeros_like(p) for name, p in params.items()}
        was_training = self.model.training
        self.model.eval()  # BatchNorm statistics must not move while estimating the Fisher
        for i in sel.tolist():
            x = self.scenario.preprocess(data.x[i : i + 1], train=False).to(self.device)
            y = data.y[i : i + 1].to(self.device)
            self.model.zero_grad(set_to_none=True)
            logp = F.log_softmax(self.masked_logits(self.model(x), task), dim=1)
            (-F.nll_loss(logp, y)).backward()
            for name, p in params.items():
                if p.grad is not None:
                    fish[name] += p.grad.detach() ** 2
        self.model.zero_grad(set_to_none=True)
        self.model.train(was_training)
        k = float(len(sel))
        for name in fish:
            fish[name] /= k
        if self.fisher is None:
            self.fisher = fish
        else:
            gamma = self.cfg["ewc_gamma"]
            self.fisher = {name: gamma * self.fisher[name] + fish[name] for name in fish}
        self.anchor = {name: p.detach().clone() for name, p in params.items()}
        super().end_task(task)

    def state_dict(self) -> dict:
        s = super().state_dict()
        s["fisher"], s["anchor"] = self.fisher, self.anchor
        return s

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.fisher, self.anchor = state["fisher"], state["anchor"]


def make_strategy(name: str, model, scenario, cfg, device, plugins=()) -> Strategy:
    """The strategy of the method registered under ``name`` (see :mod:`sparsekern_cl.registry`)."""
    from .registry import get_method  # the registry imports this module

    return get_method(name).strategy(model, scenario, cfg, device, plugins)


def __getattr__(name: str):
    if name == "STRATEGIES":  # the registry's view, {method: strategy class}
        from .registry import STRATEGIES

        return STRATEGIES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
