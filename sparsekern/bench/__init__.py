"""The benchmark suite: ``python -m sparsekern.bench`` (``--help`` for the options).

One runner over a registry of cases (:mod:`.cases`): op (spmm, sddmm, linear, conv2d, the
mask-to-metadata rebuild, a training step and a short training epoch) x provider (dense PyTorch,
``torch.sparse``, and the sparsekern backends reference / cpp / triton / cuda, each where it is
available) x mode x shape x sparsity x layout x dtype.  Timing is ``torch.utils.benchmark`` at a
pinned thread count on CPU and ``triton.testing.do_bench`` on GPU (:mod:`.timing`).  Results are
one tidy CSV row per case; the Markdown tables, the plot and the README section are made from it
(:mod:`.report`).  Every speed is also given as a ratio against dense PyTorch measured in the same
run, and each case with a goal in DESIGN.md section 6 says whether it met it (:mod:`.goals`).

Importing this package imports torch and sparsekern only (no Triton, no CUDA initialisation).
"""

from .cases import PRESETS, Case, Selection, expand
from .providers import Skip, availability, prepare
from .runner import COLUMNS, collect_meta, run_cases
from .timing import Timing, TimingConfig

__all__ = [
    "COLUMNS",
    "PRESETS",
    "Case",
    "Selection",
    "Skip",
    "Timing",
    "TimingConfig",
    "availability",
    "collect_meta",
    "expand",
    "prepare",
    "run",
    "run_cases",
]


def run(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (see ``python -m sparsekern.bench --help``)."""
    from .__main__ import main

    return main(argv)
