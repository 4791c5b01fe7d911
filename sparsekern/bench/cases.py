"""The registry of benchmark cases: ops, providers, modes, shape sets, layouts and presets.

A :class:`Case` is one timed measurement.  :func:`expand` turns a :class:`Selection` (what the
command line or a preset asks for) into the ordered list of cases, each group of sparse cases
preceded by the dense case it is compared with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

__all__ = [
    "OPS",
    "PROVIDERS",
    "AUTOCAST_PROVIDERS",
    "DENSE_PROVIDERS",
    "MODES",
    "LAYOUTS",
    "DTYPES",
    "LinearShape",
    "ConvShape",
    "ModelShape",
    "SHAPE_SETS",
    "Case",
    "Selection",
    "Preset",
    "PRESETS",
    "expand",
    "block_of",
    "base_provider",
    "network_layers",
]

# op names; the stem of each matches the library's functional op where there is one
OPS = ("spmm", "sddmm", "linear", "conv2d", "rebuild", "train_step", "train_epoch")
# "dense" is plain PyTorch with a dense weight; "torch.sparse" a CSR/BSR weight; the rest are
# sparsekern backends (``backend=``).  "<name>-bf16": provider <name> under
# torch.autocast(device, torch.bfloat16) on the case's fp32 tensors (fp32 master weights: what a
# user runs for speed); "dense-bf16" is the dense baseline a bf16 user compares against.
PROVIDERS = ("dense", "dense-bf16", "torch.sparse", "reference", "cpp", "cpp-bf16", "triton", "cuda", "auto",
             "auto-bf16")  # fmt: skip
#: the autocast providers and the provider each runs under bf16 autocast
AUTOCAST_PROVIDERS = {"dense-bf16": "dense", "cpp-bf16": "cpp", "auto-bf16": "auto"}
#: the dense baselines of a group (every sparse case is compared with each, and with the fastest)
DENSE_PROVIDERS = ("dense", "dense-bf16")
#: "auto": sparsekern with no backend= (the default a user gets: the automatic order, then the
#: per-call choice between the sparse kernels and dense masked compute, sparsekern.choice) with
#: the sparse-aware optimizer step (sparsekern.optim); timed on whole models only
SPARSEKERN_PROVIDERS = ("reference", "cpp", "triton", "cuda", "auto", "cpp-bf16", "auto-bf16")
E2E_ONLY_PROVIDERS = ("auto", "auto-bf16")
MODES = ("fwd", "bwd", "fwd+bwd")
LAYOUTS = ("unstructured", "block16", "block32", "block64", "block128")
# "tfloat32": float32 tensors with TF32 allowed in cuBLAS / cuDNN and the Triton kernels (GPU);
# "float32" on a GPU means TF32 off, the setting of the fp32 goals
DTYPES = ("float32", "bfloat16", "float16", "float64", "tfloat32")

# which modes an op can be timed in
OP_MODES = {
    "spmm": MODES,
    "sddmm": MODES,
    "linear": MODES,
    "conv2d": MODES,
    "rebuild": ("build",),
    "train_step": ("train",),
    "train_epoch": ("train",),
}


def base_provider(provider: str) -> str:
    """The provider an autocast provider runs (``"cpp-bf16"`` -> ``"cpp"``); others as they are."""
    return AUTOCAST_PROVIDERS.get(provider, provider)


def block_of(layout: str) -> int | None:
    """``"block32"`` -> 32; ``"unstructured"`` / ``"dense"`` -> None."""
    if layout.startswith("block"):
        return int(layout[len("block") :])
    return None


@dataclass(frozen=True)
class LinearShape:
    """``y[N, out] = x[N, in] @ W[out, in]ᵀ`` (spmm, sddmm, linear, rebuild)."""

    name: str
    in_features: int
    out_features: int
    batches: tuple[int, ...]
    family: str = "mlp"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def dims(self, batch: int) -> str:
        return f"N{batch}-K{self.in_features}-M{self.out_features}"

    def positions(self, batch: int) -> int:
        """Rows that each weight entry multiplies (the FLOP count is 2·positions·nnz per pass)."""
        return batch


@dataclass(frozen=True)
class ConvShape:
    """A conv2d layer ``[N, cin, hw, hw] -> [N, cout, ho, ho]`` with a ``k×k`` kernel (conv2d, rebuild)."""

    name: str
    cin: int
    cout: int
    hw: int
    kernel: int
    stride: int
    padding: int
    batches: tuple[int, ...]
    family: str = "resnet18-cifar"
    count: int = 0  # how many layers of this shape the family's network has (0: not part of a network sum)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.cout, self.cin, self.kernel, self.kernel)

    @property
    def out_hw(self) -> int:
        return (self.hw + 2 * self.padding - self.kernel) // self.stride + 1

    def dims(self, batch: int) -> str:
        return f"N{batch}-C{self.cin}-O{self.cout}-{self.hw}x{self.hw}-k{self.kernel}-s{self.stride}"

    def positions(self, batch: int) -> int:
        return batch * self.out_hw * self.out_hw


@dataclass(frozen=True)
class ModelShape:
    """A whole model for ``train_step`` / ``train_epoch`` (built by :func:`sparsekern.bench.providers.build_model`)."""

    name: str
    model: str  # "resnet18" | "mlp"
    width: int  # nf for resnet18, hidden size for the MLP
    batches: tuple[int, ...]
    steps_per_epoch: int = 8
    family: str = "e2e"

    def dims(self, batch: int) -> str:
        if self.model == "resnet18":
            return f"resnet18-nf{self.width}-32x32-N{batch}"
        if self.model == "mlp-cl":
            return f"mlp-784-{self.width}-{self.width}-10-N{batch}"
        return f"mlp-768-{self.width}-N{batch}"


# the 3x3 convs inside the residual stages of a CIFAR ResNet-18 (3x3 stem, no max-pool) on a
# 32x32 input: (name, in, out, input side, stride, how many layers of the network have the shape)
_R18_3X3 = (
    ("l1", 64, 64, 32, 1, 4),
    ("l2-down", 64, 128, 32, 2, 1),
    ("l2", 128, 128, 16, 1, 3),
    ("l3-down", 128, 256, 16, 2, 1),
    ("l3", 256, 256, 8, 1, 3),
    ("l4-down", 256, 512, 8, 2, 1),
    ("l4", 512, 512, 4, 1, 3),
)


def _r18_cifar(batches, prefix: str = "r18c", scale: int = 1, family: str = "resnet18-cifar") -> list[ConvShape]:
    """One shape per distinct conv of the network, inputs ``scale`` times 32x32 (the stem at scale 1 only)."""
    out = [ConvShape(f"{prefix}-stem", 3, 64, 32, 3, 1, 1, batches, family)] if scale == 1 else []
    for name, cin, cout, hw, stride, count in _R18_3X3:
        b = tuple(sorted({*batches, 4 * batches[0]})) if name == "l1" and scale == 1 else batches
        out.append(ConvShape(f"{prefix}-{name}", cin, cout, hw * scale, 3, stride, 1, b, family, count))
    return out


def _r18_imagenet(batches) -> list[ConvShape]:
    return [
        ConvShape("r18i-stem", 3, 64, 224, 7, 2, 3, batches, "resnet18-imagenet"),
        ConvShape("r18i-l1", 64, 64, 56, 3, 1, 1, batches, "resnet18-imagenet"),
        ConvShape("r18i-l3", 256, 256, 14, 3, 1, 1, batches, "resnet18-imagenet"),
    ]


def _r50(batches) -> list[ConvShape]:
    # bottleneck of stage 1 (56x56) and stage 3 (14x14): 1x1 reduce, 3x3, 1x1 expand
    return [
        ConvShape("r50-s1-reduce", 256, 64, 56, 1, 1, 0, batches, "resnet50"),
        ConvShape("r50-s1-3x3", 64, 64, 56, 3, 1, 1, batches, "resnet50"),
        ConvShape("r50-s1-expand", 64, 256, 56, 1, 1, 0, batches, "resnet50"),
        ConvShape("r50-s3-reduce", 1024, 256, 14, 1, 1, 0, batches, "resnet50"),
        ConvShape("r50-s3-3x3", 256, 256, 14, 3, 1, 1, batches, "resnet50"),
        ConvShape("r50-s3-expand", 256, 1024, 14, 1, 1, 0, batches, "resnet50"),
    ]


def _mlp(batches) -> list[LinearShape]:
    return [
        LinearShape("mlp-768x3072", 768, 3072, tuple(sorted({*batches, 4 * batches[0]}))),
        LinearShape("mlp-3072x768", 3072, 768, batches),
        LinearShape("mlp-4096x4096", 4096, 4096, batches),
    ]


def _llm_mlp(batches) -> list[LinearShape]:
    # the feed-forward layers of 1024- and 4096-wide transformers (up and down projections)
    return [
        LinearShape(f"mlp-{k}x{m}", k, m, batches)
        for k, m in ((1024, 4096), (4096, 1024), (4096, 11008), (11008, 4096))
    ]


# named shape sets, selectable with --shapes (a set name or single shape names)
SHAPE_SETS: dict[str, list] = {
    "tiny-linear": [LinearShape("tiny", 64, 48, (16,), "tiny")],
    "tiny-conv": [ConvShape("tiny-conv", 8, 16, 8, 3, 1, 1, (2,), "tiny")],
    "tiny-model": [ModelShape("tiny-mlp", "mlp", 64, (8,), 2, "tiny")],
    # the first layer of each set is also timed at 4x the batch
    "mlp": _mlp((128,)),
    "llm-mlp": _llm_mlp((8192,)),
    "resnet18-cifar": _r18_cifar((16,)),
    "resnet18-cifar-64px": _r18_cifar((128,), "r18c64", 2, "resnet18-cifar-64px"),
    "resnet18-imagenet": _r18_imagenet((4,)),
    "resnet50": _r50((4,)),
    "e2e-resnet18-nf20": [ModelShape("e2e-resnet18-nf20", "resnet18", 20, (16,), 4)],
    # what users train: the papers' ResNet-18 on 32x32 inputs (nf 20 and 64, batch 32 and 128)
    # and the main job's MLP 784-1000-1000-10 at its batch of 32
    "e2e-user": [
        ModelShape("e2e-r18-nf20", "resnet18", 20, (32, 128), 4),
        ModelShape("e2e-r18-nf64", "resnet18", 64, (32,), 2),
        ModelShape("e2e-mlp784", "mlp-cl", 1000, (32,), 32),
    ],
    "e2e": [
        ModelShape("e2e-resnet18", "resnet18", 64, (32,), 4),
        ModelShape("e2e-mlp", "mlp", 3072, (64,), 4),
    ],
    # the reduced ResNet-18 of the continual-learning literature (nf=20)
    "e2e-small": [
        ModelShape("e2e-resnet18-nf20-N32", "resnet18", 20, (32,), 4),
        ModelShape("e2e-mlp", "mlp", 3072, (64,), 4),
    ],
}


# the seven ResNet-18 convs whose times, each times its count, sum to the network's 3x3 convs
SHAPE_SETS["resnet18-cifar-3x3"] = [s for s in SHAPE_SETS["resnet18-cifar"] if s.count]


def all_shapes() -> dict[str, object]:
    out = {}
    for shapes in SHAPE_SETS.values():
        for s in shapes:
            out.setdefault(s.name, s)
    return out


def network_layers(family: str) -> dict[str, int]:
    """``{shape name: count}`` of the layers whose times sum to a network's (empty if the family has none)."""
    return {s.name: s.count for s in all_shapes().values() if getattr(s, "count", 0) and s.family == family}


def _shape_fits(op: str, shape) -> bool:
    if op in ("spmm", "sddmm", "linear"):
        return isinstance(shape, LinearShape)
    if op == "conv2d":
        return isinstance(shape, ConvShape)
    if op == "rebuild":
        return isinstance(shape, (LinearShape, ConvShape))
    return isinstance(shape, ModelShape)


@dataclass(frozen=True)
class Case:
    """One timed measurement.  ``sparsity`` 0 with ``layout="dense"`` is a dense baseline."""

    op: str
    provider: str
    mode: str
    shape: object
    batch: int
    sparsity: float
    layout: str
    dtype: str
    device: str

    @property
    def shape_name(self) -> str:
        return self.shape.name

    @property
    def dims(self) -> str:
        return self.shape.dims(self.batch)

    @property
    def id(self) -> str:
        return (
            f"{self.op}-{self.provider}-{self.mode}-{self.shape_name}-N{self.batch}-"
            f"s{round(self.sparsity * 100)}-{self.layout}-{self.dtype}-{self.device}"
        )

    def dense_key(self) -> tuple:
        """Cases with the same key are compared with the same dense measurement."""
        mode = "fwd+bwd" if self.op == "rebuild" else self.mode
        op = {"rebuild": "linear" if isinstance(self.shape, LinearShape) else "conv2d"}.get(self.op, self.op)
        return (op, mode, self.shape_name, self.batch, self.dtype, self.device)

    def dense_case(self) -> Case:
        op, mode = self.dense_key()[:2]
        return replace(self, op=op, mode=mode, provider="dense", sparsity=0.0, layout="dense")


@dataclass
class Selection:
    """What to run: every field is a list; the cross product is filtered to what makes sense."""

    ops: list[str] = field(default_factory=lambda: ["linear"])
    providers: list[str] = field(default_factory=lambda: list(PROVIDERS))
    modes: list[str] = field(default_factory=lambda: ["fwd+bwd"])
    shapes: list[str] = field(default_factory=lambda: ["tiny-linear"])
    sparsities: list[float] = field(default_factory=lambda: [0.9])
    layouts: list[str] = field(default_factory=lambda: ["unstructured"])
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    device: str = "cpu"
    batches: list[int] | None = None  # None: each shape's own batch sizes
    e2e_sparsities: list[float] = field(default_factory=lambda: [0.0, 0.75, 0.9, 0.95])
    e2e_layouts: list[str] = field(default_factory=lambda: ["unstructured"])
    ops_modes: dict[str, list[str]] = field(default_factory=dict)  # per-op override of ``modes``
    op_shapes: dict[str, list[str]] = field(default_factory=dict)  # per-op override of ``shapes``
    op_sparsities: dict[str, list[float]] = field(default_factory=dict)
    op_layouts: dict[str, list[str]] = field(default_factory=dict)
    op_batches: dict[str, list[int]] = field(default_factory=dict)
    # per-provider restrictions (e.g. the reference, whose speed does not depend on sparsity,
    # at one sparsity only), applied to the kernel ops
    provider_sparsities: dict[str, list[float]] = field(default_factory=dict)
    provider_modes: dict[str, list[str]] = field(default_factory=dict)


def resolve_shapes(names: list[str]) -> list:
    """Shape-set names and single shape names -> shape objects (first occurrence wins)."""
    known = all_shapes()
    out, seen = [], set()
    for n in names:
        if n in SHAPE_SETS:
            group = SHAPE_SETS[n]
        elif n in known:
            group = [known[n]]
        else:
            raise ValueError(
                f"--shapes: unknown shape or set {n!r}; sets: {sorted(SHAPE_SETS)}; shapes: {sorted(known)}"
            )
        for s in group:
            if s.name not in seen:
                seen.add(s.name)
                out.append(s)
    return out


def expand(sel: Selection | Preset | Sequence[Selection]) -> list[Case]:
    """The ordered cases of ``sel``: per group, the dense baseline first, then the sparse cases.

    A :class:`Preset` (or a list of selections) gives the cases of each selection in turn, each
    case once.
    """
    if isinstance(sel, Preset):
        sel = sel.selections
    if not isinstance(sel, Selection):
        out: dict[str, Case] = {}
        for one in sel:
            for c in expand(one):
                out.setdefault(c.id, c)
        return list(out.values())
    return _expand_one(sel)


def _expand_one(sel: Selection) -> list[Case]:
    for name, values, allowed in (
        ("--ops", sel.ops, OPS),
        ("--providers", sel.providers, PROVIDERS),
        ("--modes", sel.modes, MODES),
        ("--layouts", sel.layouts + sel.e2e_layouts, LAYOUTS),
        ("--dtypes", sel.dtypes, DTYPES),
    ):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"{name}: unknown value(s) {bad}; expected a subset of {list(allowed)}")
    for s in list(sel.sparsities) + list(sel.e2e_sparsities):
        if not (0.0 <= s < 1.0) or math.isnan(s):
            raise ValueError(f"--sparsity: expected values in [0, 1), got {s!r}")
    if sel.device not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected 'cpu' or 'cuda', got {sel.device!r}")
    cases: list[Case] = []
    seen: set[str] = set()

    def add(c: Case) -> None:
        if c.id not in seen:
            seen.add(c.id)
            cases.append(c)

    for op in sel.ops:
        shapes = [s for s in resolve_shapes(sel.op_shapes.get(op, sel.shapes)) if _shape_fits(op, s)]
        if op in ("train_step", "train_epoch"):
            modes = ["train"]
            sparsities = sel.op_sparsities.get(op, sel.e2e_sparsities)
            layouts = sel.op_layouts.get(op, sel.e2e_layouts)
        elif op == "rebuild":
            modes = ["build"]
            sparsities = sel.op_sparsities.get(op, sel.sparsities)
            layouts = sel.op_layouts.get(op, sel.layouts)
        else:
            modes = [m for m in sel.ops_modes.get(op, sel.modes) if m in OP_MODES[op]]
            sparsities = sel.op_sparsities.get(op, sel.sparsities)
            layouts = sel.op_layouts.get(op, sel.layouts)
        for shape in shapes:
            for batch in sel.op_batches.get(op) or sel.batches or shape.batches:
                for dtype in sel.dtypes:
                    for mode in modes:
                        base = Case(op, "dense", mode, shape, batch, 0.0, "dense", dtype, sel.device)
                        add(base.dense_case() if op == "rebuild" else base)
                        if op != "rebuild" and "dense-bf16" in sel.providers and dtype == "float32":
                            add(replace(base, provider="dense-bf16"))  # the second baseline
                        if op == "rebuild":
                            for layout in layouts:
                                for s in sparsities:
                                    add(Case(op, "formats", mode, shape, batch, s, layout, dtype, sel.device))
                            continue
                        for layout in layouts:
                            for s in sparsities:
                                for p in sel.providers:
                                    if p in DENSE_PROVIDERS or (
                                        p in E2E_ONLY_PROVIDERS and op not in ("train_step", "train_epoch")
                                    ):
                                        continue
                                    if p in AUTOCAST_PROVIDERS and dtype != "float32":
                                        continue  # autocast takes the fp32 tensors of a case
                                    if s not in sel.provider_sparsities.get(p, [s]) or (
                                        op not in ("train_step", "train_epoch")
                                        and mode not in sel.provider_modes.get(p, [mode])
                                    ):
                                        continue
                                    add(Case(op, p, mode, shape, batch, s, layout, dtype, sel.device))
    return cases


@dataclass(frozen=True)
class Preset:
    """A named case set for ``--preset``: the union of ``selections`` (each expanded in turn).

    Attributes:
        about: one line for ``--help``.
        selections: what to run; several when the grid is not one cross product.
        timing: the :class:`~sparsekern.bench.timing.TimingConfig` fields of the run.
        stem: file stem of the results (default ``bench_<device>_<preset>``).
        check: before timing, compare each compiled kernel's outputs with the reference
            backend's (the ``max_rel_err`` column).
    """

    about: str
    selections: tuple[Selection, ...]
    timing: dict
    stem: str | None = None
    check: bool = False

    @property
    def device(self) -> str:
        return self.selections[0].device


# timing budgets; "quick" keeps its run near a minute on 2 cores
_T_SMOKE = dict(warmup=1, min_time=0.0, block_time=0.0, min_samples=2, max_samples=2)
_T_QUICK = dict(warmup=1, min_time=0.15, block_time=0.01, min_samples=3, max_samples=20)
_T_FULL = dict(warmup=2, min_time=0.2, block_time=0.02, min_samples=5, max_samples=30)
_T_KERNELS = dict(warmup=2, min_time=1.0, block_time=0.02, min_samples=5, max_samples=50)  # one second per case
_T_GPU = dict(warmup=1, min_time=0.1, block_time=0.0, min_samples=1, max_samples=1)  # do_bench, 100 ms per case

# CPU kernel steps: fwd + input gradient + weight gradient of a layer without bias (spmm is
# sparse_linear with bias None), against dense and torch.sparse; ResNet-18's 3x3 convs
_CPU_SPMM = dict(ops=["spmm"], providers=["dense", "cpp", "torch.sparse"], modes=["fwd+bwd"])
_CPU_CONV = dict(ops=["conv2d"], providers=["dense", "cpp"], modes=["fwd+bwd"], shapes=["resnet18-cifar-3x3"])
_BLOCK90 = dict(sparsities=[0.9], layouts=["block16", "block32"])


# the CPU bf16 goal cases: the same steps under bf16 autocast against dense under bf16 autocast
# (and dense fp32), and a ResNet-18 training epoch under autocast
_BF16_SPMM = dict(ops=["spmm"], providers=["dense", "dense-bf16", "cpp-bf16"], modes=["fwd+bwd"])
_BF16_CONV = dict(_BF16_SPMM, ops=["conv2d"], shapes=["resnet18-cifar-3x3"])


def _bf16_goals() -> tuple[Selection, ...]:
    out = []
    for shape, batches in (("mlp-768x3072", [256, 2048]), ("mlp-4096x4096", [256])):
        out.append(Selection(**_BF16_SPMM, shapes=[shape], batches=batches, sparsities=[0.9, 0.95, 0.98]))
        out.append(Selection(**_BF16_SPMM, shapes=[shape], batches=batches, **_BLOCK90))
    out.append(Selection(**_BF16_CONV, batches=[32, 128], sparsities=[0.9]))
    out.append(
        Selection(
            ops=["train_epoch"],
            providers=["dense", "dense-bf16", "cpp-bf16", "auto-bf16"],
            shapes=["e2e-r18-nf20", "e2e-r18-nf64"],
            e2e_sparsities=[0.9],
        )
    )
    return tuple(out)


def _cpu_kernels() -> tuple[Selection, ...]:
    out = []
    for shape, batches in (("mlp-768x3072", [256, 2048]), ("mlp-4096x4096", [256])):
        out.append(Selection(**_CPU_SPMM, shapes=[shape], batches=batches, sparsities=[0.9, 0.95, 0.98]))
        out.append(Selection(**_CPU_SPMM, shapes=[shape], batches=batches, **_BLOCK90))
    out.append(Selection(**_CPU_CONV, batches=[32, 128], sparsities=[0.9, 0.95]))
    out.append(Selection(**_CPU_CONV, batches=[32], **_BLOCK90))
    return tuple(out)


# GPU: tokens x in -> out products (fwd, bwd = dx + dW, fwd+bwd) against cuBLAS and torch.sparse;
# ResNet-18's 3x3 convs at batch 128 on 32x32 and 64x64 inputs against cuDNN
_GPU_SPMM = dict(ops=["spmm"], providers=["dense", "triton", "torch.sparse"], modes=list(MODES), batches=[8192],
                 device="cuda")  # fmt: skip
_GPU_SPMM_SHAPES = ["mlp-4096x4096", "mlp-768x3072", "mlp-3072x768", "mlp-1024x4096"]
_GPU_DTYPES = ["bfloat16", "float16", "float32", "tfloat32"]
_GPU_SPARSITIES = [0.5, 0.7, 0.9, 0.95, 0.98]
_GPU_CONV = dict(ops=["conv2d"], providers=["dense", "triton"], modes=["fwd+bwd"], batches=[128], device="cuda",
                 shapes=["resnet18-cifar-3x3", "resnet18-cifar-64px"])  # fmt: skip

# "smoke" for the test suite, "quick" about a minute on 2 cores, "full" the CPU sweep (about a
# quarter of an hour on 2 shared cores); the kernel presets are the goal cases of DESIGN.md section 6
PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        "tiny shapes, every provider (the test suite's run; no goal applies)",
        (
            Selection(
                ops=["linear"],
                providers=list(PROVIDERS),
                modes=["fwd+bwd"],
                shapes=["tiny-linear"],
                sparsities=[0.9],
                layouts=["unstructured", "block16"],
            ),
        ),  # fmt: skip
        _T_SMOKE,
        check=True,
    ),
    "quick": Preset(
        "one shape per op and a training step, about a minute on 2 cores",
        (
            Selection(
                ops=["spmm", "sddmm", "linear", "conv2d", "rebuild", "train_step"],
                providers=list(PROVIDERS),
                modes=["fwd+bwd"],
                ops_modes={"spmm": ["fwd"], "sddmm": ["fwd"]},
                shapes=["mlp-768x3072", "r18c-l2"],
                batches=[32],
                sparsities=[0.9],
                layouts=["unstructured", "block32"],
                op_shapes={"train_step": ["e2e-resnet18-nf20"]},
                op_batches={"train_step": [16]},
                e2e_sparsities=[0.0, 0.9],
            ),
        ),
        _T_QUICK,
    ),
    "full": Preset(
        "the CPU sweep: every op, ResNet-18/50 and MLP shapes, 4 layouts, training steps and epochs",
        (
            Selection(
                ops=["spmm", "sddmm", "linear", "conv2d", "rebuild", "train_step", "train_epoch"],
                providers=list(PROVIDERS),
                modes=["fwd+bwd"],
                ops_modes={"spmm": ["fwd"], "sddmm": ["fwd"]},
                shapes=[
                    "mlp-768x3072",
                    "mlp-4096x4096",
                    "resnet18-cifar",
                    "resnet18-imagenet",
                    "resnet50",
                    "e2e-small",
                ],
                sparsities=[0.75, 0.9, 0.95, 0.98],
                layouts=["unstructured", "block16", "block32", "block64"],
                op_sparsities={"spmm": [0.5, 0.75, 0.9, 0.95, 0.98], "conv2d": [0.9, 0.95], "rebuild": [0.9]},
                op_layouts={"conv2d": ["unstructured", "block16", "block32"]},
                op_shapes={
                    "spmm": ["mlp-768x3072"],
                    "sddmm": ["mlp-768x3072"],
                    "rebuild": ["mlp-4096x4096", "r18c-l4", "r50-s3-3x3"],
                },
                op_batches={"spmm": [128], "sddmm": [128], "linear": [128]},
                # the reference's speed does not depend on sparsity (dense masked math): one level;
                # torch.sparse forward only (its fwd+bwd step is in the cpu-kernels preset)
                provider_sparsities={"reference": [0.9]},
                provider_modes={"torch.sparse": ["fwd"]},
                e2e_sparsities=[0.0, 0.75, 0.9, 0.95],
            ),
        ),
        _T_FULL,
    ),
    "cpu-kernels": Preset(
        "CPU goal cases: linear (spmm) 768->3072 N256/N2048, 4096->4096 N256 at 90/95/98 % and block 16/32; "
        "ResNet-18 3x3 convs N32/N128 (cpp vs dense and torch.sparse, fwd+bwd)",
        _cpu_kernels(),
        _T_KERNELS,
        stem="cpu_kernels",
    ),
    "cpu-kernels-quick": Preset(
        "a handful of the cpu-kernels cases",
        (
            Selection(**_CPU_SPMM, shapes=["mlp-768x3072"], batches=[256], sparsities=[0.9, 0.98]),
            Selection(**_CPU_SPMM, shapes=["mlp-768x3072"], batches=[256], sparsities=[0.9], layouts=["block32"]),
            Selection(
                **{**_CPU_CONV, "shapes": ["r18c-l2"]},
                batches=[32],
                sparsities=[0.9],
                layouts=["unstructured", "block16"],
            ),  # fmt: skip
        ),
        _T_KERNELS,
        stem="cpu_kernels_quick",
    ),
    "bf16": Preset(
        "CPU bf16 goal cases: the cpu-kernels linear steps at 90/95/98 % and block 16/32, ResNet-18 3x3 convs "
        "N32/N128 at 90 %, ResNet-18 epochs at 90 % -- cpp under bf16 autocast vs dense bf16 autocast and dense fp32",
        _bf16_goals(),
        _T_KERNELS,
        stem="cpu_bf16",
    ),
    "gpu-linear": Preset(
        "GPU products of 8192 tokens, 4 shapes x 5 layouts x 5 sparsities x bf16/fp16/fp32/tf32 x fwd/bwd/fwd+bwd "
        "(triton vs cuBLAS and torch.sparse)",
        (
            Selection(
                **_GPU_SPMM,
                shapes=_GPU_SPMM_SHAPES,
                layouts=list(LAYOUTS),
                sparsities=_GPU_SPARSITIES,
                dtypes=_GPU_DTYPES,
            ),
        ),  # fmt: skip
        _T_GPU,
        stem="gpu_linear",
        check=True,
    ),
    "gpu-linear-quick": Preset(
        "the GPU matmul goal cases and some context: 2 shapes, unstructured and block 64, bf16 and fp32",
        (
            Selection(
                **_GPU_SPMM,
                shapes=_GPU_SPMM_SHAPES[:2],
                layouts=["unstructured", "block64"],
                sparsities=[0.5, 0.9, 0.98],
                dtypes=["bfloat16", "float32"],
            ),
        ),  # fmt: skip
        _T_GPU,
        stem="gpu_linear_quick",
        check=True,
    ),
    "gpu-linear-full": Preset(
        "gpu-linear on 7 shapes, up to 4096->11008",
        (
            Selection(
                **_GPU_SPMM,
                shapes=[*_GPU_SPMM_SHAPES, "mlp-4096x1024", "mlp-4096x11008", "mlp-11008x4096"],
                layouts=list(LAYOUTS),
                sparsities=_GPU_SPARSITIES,
                dtypes=_GPU_DTYPES,
            ),
        ),  # fmt: skip
        _T_GPU,
        stem="gpu_linear_full",
        check=True,
    ),
    "gpu-conv": Preset(
        "GPU ResNet-18 3x3 convs, batch 128, 32x32 and 64x64 inputs, 80-98 %, unstructured and block 16/32/64, "
        "bf16 and fp32 (triton vs cuDNN, fwd+bwd)",
        (
            Selection(
                **_GPU_CONV,
                layouts=["unstructured", "block16", "block32", "block64"],
                sparsities=[0.8, 0.9, 0.95, 0.98],
                dtypes=["bfloat16", "float32"],
            ),
        ),  # fmt: skip
        _T_GPU,
        stem="gpu_conv",
        check=True,
    ),
    "gpu-conv-quick": Preset(
        "the GPU conv goal cases: block 64, 90 %, bf16",
        (Selection(**_GPU_CONV, layouts=["block64"], sparsities=[0.9], dtypes=["bfloat16"]),),
        _T_GPU,
        stem="gpu_conv_quick",
        check=True,
    ),
    "e2e": Preset(
        "training epochs users run: ResNet-18 (nf 20 / 64, 32x32) and the main job's MLP, dense vs cpp vs auto, "
        "each also under bf16 autocast",
        (
            Selection(
                ops=["train_epoch"],
                providers=["dense", "dense-bf16", "cpp", "cpp-bf16", "auto", "auto-bf16"],
                modes=["fwd+bwd"],
                shapes=["e2e-user"],
                e2e_sparsities=[0.9, 0.95],
            ),
        ),
        _T_QUICK,
        stem="e2e_cpu",
    ),
}
