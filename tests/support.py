"""What the suite knows about this machine and the backends: the requirement markers and the one
strictness switch (applied by tests/conftest.py), the backends under test with their device, the
support matrix the README's backend table documents, and the parametrizations of the op suites.

Strictness: ``SPARSEKERN_STRICT=1`` (``CI=true`` implies it) turns a missing requirement of a
``requires_cpp`` or ``requires_nvcc`` test ("C++ kernels not built", "nvcc not found") into a
failure, so a broken build cannot pass as a run of skips.  The other markers always skip with the
reason: Triton and a GPU are optional.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch

from sparsekern._backends import LINEAR_OPS, OPS, get_backend

ROOT = Path(__file__).resolve().parents[1]


def strict_from(env) -> bool:
    """``SPARSEKERN_STRICT`` set (to anything but 0 / false / no / off, as setup.py reads it), or
    ``CI=true``, in ``env``."""
    strict = env.get("SPARSEKERN_STRICT", "").strip().lower() not in ("", "0", "false", "no", "off")
    return strict or env.get("CI", "").strip().lower() == "true"


STRICT = strict_from(os.environ)
HAS_GPU = torch.cuda.is_available()
#: whether Triton kernels run in its interpreter (tests/conftest.py sets it when there is no GPU)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")

FP32, FP64, FP16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
DTYPES = (FP32, FP64, FP16, BF16)
HALF = (FP16, BF16)
DTYPE_IDS = {FP32: "fp32", FP64: "fp64", FP16: "fp16", BF16: "bf16"}


# ------------------------------------------------------------------------------------------------
# requirements (markers)
# ------------------------------------------------------------------------------------------------


@cache
def cpp_status() -> tuple[bool, str]:
    from sparsekern.kernels.cpu import load_library

    return load_library()


@cache
def triton_status() -> tuple[bool, str]:
    return get_backend("triton").available()


@cache
def cuda_status() -> tuple[bool, str]:
    if not HAS_GPU:
        return False, "no CUDA device"
    return get_backend("cuda").available()


def gpu_status() -> tuple[bool, str]:
    return HAS_GPU, "no CUDA device"


@cache
def nvcc_path() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for cand in sorted(Path("/usr/local").glob("cuda*/bin/nvcc")):
            nvcc = str(cand)
    return nvcc


def nvcc_status() -> tuple[bool, str]:
    return nvcc_path() is not None, "nvcc not found (PATH, /usr/local/cuda*/bin)"


@dataclass(frozen=True)
class Requirement:
    check: object  # () -> (ok, reason)
    strict: bool  # under SPARSEKERN_STRICT a missing requirement fails the test
    what: str


REQUIREMENTS = {
    "requires_cpp": Requirement(cpp_status, True, "the C++ kernels (sparsekern._C) built and loadable"),
    "requires_nvcc": Requirement(nvcc_status, True, "nvcc, for the CUDA compile checks"),
    "requires_triton": Requirement(triton_status, False, "the triton package"),
    "requires_cuda": Requirement(cuda_status, False, "a CUDA device and the CUDA build of sparsekern._C"),
    "requires_gpu": Requirement(gpu_status, False, "a CUDA device"),
}

requires_cpp = pytest.mark.requires_cpp
requires_nvcc = pytest.mark.requires_nvcc
requires_triton = pytest.mark.requires_triton
requires_cuda = pytest.mark.requires_cuda
requires_gpu = pytest.mark.requires_gpu


def _unmet(item):
    """``(marker name, requirement, reason)`` of each requirement of ``item`` this machine lacks."""
    for mark in item.iter_markers():
        req = REQUIREMENTS.get(mark.name)
        if req is not None:
            ok, why = req.check()
            if not ok:
                yield mark.name, req, why


def skip_unmet(items) -> None:
    """At collection: a test whose requirement is missing is skipped with the reason (shown at the
    test), unless the requirement is strict and SPARSEKERN_STRICT applies (then check_strict fails it)."""
    for item in items:
        for name, req, why in _unmet(item):
            if not (req.strict and STRICT):
                item.add_marker(pytest.mark.skip(reason=f"{name}: {why}"))
                break


def check_strict(item) -> None:
    """At setup: fail a test whose strict requirement is missing under SPARSEKERN_STRICT."""
    for name, req, why in _unmet(item):
        if req.strict and STRICT:
            pytest.fail(f"{name}: needs {req.what}, which SPARSEKERN_STRICT=1 / CI=true require: {why}", pytrace=False)


# ------------------------------------------------------------------------------------------------
# backends under test and the documented support matrix
# ------------------------------------------------------------------------------------------------

MARKS = {"reference": (), "cpp": (requires_cpp,), "triton": (requires_triton,), "cuda": (requires_cuda,)}
#: the backends the op suites run: cuda only where a CUDA device is present
BACKENDS = ("reference", "cpp", "triton") + (("cuda",) if HAS_GPU else ())


@dataclass(frozen=True)
class Documented:
    """One row of the README's backend table."""

    ops: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    interpreter_dtypes: tuple[torch.dtype, ...] = ()  # also supported, under the Triton interpreter only
    conv: str = "any"  # "any", "groups=1" or "groups=1, depthwise"


#: README.md, "Backends": | backend | ops | dtypes | notes |  (tests/ops/test_backend_table.py keeps the two in step)
DOCUMENTED = {
    "cpp": Documented(("linear", "spmm", "sddmm", "conv2d"), (FP32, FP64, BF16), conv="groups=1, depthwise"),
    "triton": Documented(("linear", "spmm", "sddmm", "conv2d"), (FP32, FP16, BF16), (FP64,), conv="groups=1"),
    "cuda": Documented(LINEAR_OPS, (FP16, BF16, FP32, FP64)),
    "reference": Documented(OPS, DTYPES),
}


def documented(name: str, op: str, dtype: torch.dtype, weight_shape=None, groups: int = 1) -> bool:
    """Whether the README's table says backend ``name`` runs this call (on its device here)."""
    row = DOCUMENTED[name]
    interp = name == "triton" and INTERPRETED
    if op not in row.ops or dtype not in row.dtypes + (row.interpreter_dtypes if interp else ()):
        return False
    if op != "conv2d" or groups == 1 or row.conv == "any":
        return True
    depthwise = weight_shape is not None and weight_shape[1] == 1 and weight_shape[0] % groups == 0
    return depthwise and "depthwise" in row.conv


@dataclass(frozen=True)
class Target:
    """A backend under test and the device its tensors live on."""

    name: str

    @property
    def device(self) -> torch.device:
        gpu = self.name == "cuda" or (self.name == "triton" and not INTERPRETED)
        return torch.device("cuda" if gpu else "cpu")

    @property
    def interpreted(self) -> bool:
        return self.name == "triton" and INTERPRETED

    @property
    def impl(self):
        return get_backend(self.name)

    def refused(self, exc: Exception, op: str, dtype: torch.dtype, weight_shape=None, groups: int = 1):
        """A BackendError ``exc`` from a call: a skip with the verifier's reason where the README
        documents the call as unsupported, a failure where it documents it as supported."""
        if documented(self.name, op, dtype, weight_shape, groups):
            pytest.fail(
                f"backend {self.name!r} refuses a call the README's backend table lists as supported: {exc}",
                pytrace=False,
            )
        pytest.skip(f"not in {self.name}'s support matrix: {exc}")


# ------------------------------------------------------------------------------------------------
# parametrizations
# ------------------------------------------------------------------------------------------------


def backend_params(names=BACKENDS) -> list:
    return [pytest.param(n, marks=MARKS[n], id=n) for n in names]


def _runs(target: Target, case, dtype) -> bool:
    """Which (backend, case, dtype) combinations a suite runs.  Small cases run everywhere,
    "native" ones not in the Triton interpreter, "gpu" ones on GPU backends.  On a GPU every case
    runs in every dtype; elsewhere fp32 always, fp64 on compiled backends, and fp16 / bf16 (and
    fp64 in the interpreter, whose launches are slow) on the cases marked ``all_dtypes``."""
    on_gpu = target.device.type == "cuda"
    if case.size == "gpu" and not on_gpu:
        return False
    if case.size == "native" and target.interpreted:
        return False
    if on_gpu or dtype == FP32 or case.all_dtypes:
        return True
    return dtype == FP64 and not target.interpreted


def case_params(cases, dtypes=DTYPES, names=BACKENDS) -> list:
    """``(backend, case, dtype)`` parameters for ``@pytest.mark.parametrize(..., indirect=["backend"])``;
    GPU-size cases on a machine without a GPU leave one visible skip."""
    out = []
    for name in names:
        t = Target(name)
        for case in cases:
            for dt in dtypes:
                if _runs(t, case, dt):
                    out.append(pytest.param(name, case, dt, marks=MARKS[name], id=f"{name}-{case.id}-{DTYPE_IDS[dt]}"))
    if not HAS_GPU and any(c.size == "gpu" for c in cases):
        out.append(
            pytest.param(
                "triton",
                None,
                None,
                id="gpu-sizes",
                marks=pytest.mark.skip(reason="GPU-size cases: no CUDA device here"),
            )
        )
    return out


def over_cases(cases, dtypes=DTYPES, names=BACKENDS):
    """Parametrize a test over ``backend`` (the fixture), ``case`` and ``dtype``."""
    return pytest.mark.parametrize("backend,case,dtype", case_params(cases, dtypes, names), indirect=["backend"])
