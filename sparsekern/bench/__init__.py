"""The benchmark suite: ``python -m sparsekern.bench`` (``--help`` for the options).

One runner over a registry of cases (:mod:`.cases`): op (spmm, sddmm, linear, conv2d, the
mask-to-metadata rebuild, a training step and a short training epoch) x provider (dense PyTorch,
``torch.sparse``, and the sparsekern backends reference / cpp / triton / cuda, each where it is
available) x mode x shape x sparsity x layout x dtype.  Timing is ``torch.utils.benchmark`` at a
pinned thread count on CPU and ``triton.testing.do_bench`` on GPU (:mod:`.timing`).  Results are
one tidy CSV row per case; the Markdown tables, the plot and the README section are made from it
(:mod:`.report`).  Every speed is also given as a ratio against dense PyTorch measured in the same
run, and each case with a goal in DESIGN.md section 6 says whether it met it (:mod:`.goals`,
the one place the goals live; smoke-sized shapes are never held to a goal).

Presets (``--preset``, see ``--help``): ``smoke``, ``quick``, ``full`` (the CPU sweep),
``cpu-kernels`` (the CPU goal cases: linear steps and ResNet-18's 3x3 convs against dense and
torch.sparse), ``gpu-linear`` and ``gpu-conv`` (Triton against cuBLAS / cuDNN), with ``-quick``
(and ``gpu-linear-full``) variants.  ``--compile-only SM`` compiles the Triton kernels for a GPU
target without one (:mod:`.compile`).

Importing this package imports torch and sparsekern only (no Triton, no CUDA initialisation).
"""

from .cases import PRESETS, Case, Preset, Selection, expand, network_layers
from .providers import Skip, availability, build_model, prepare
from .runner import COLUMNS, collect_meta, cpu_model, git_commit, run_cases
from .timing import Timing, TimingConfig

__all__ = [
    "COLUMNS",
    "PRESETS",
    "Case",
    "Preset",
    "Selection",
    "Skip",
    "Timing",
    "TimingConfig",
    "availability",
    "build_model",
    "collect_meta",
    "cpu_model",
    "expand",
    "git_commit",
    "network_layers",
    "prepare",
    "run",
    "run_cases",
]


def run(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (see ``python -m sparsekern.bench --help``)."""
    from .__main__ import main

    return main(argv)
