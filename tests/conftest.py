import os
import random

import pytest
import torch

# Triton reads TRITON_INTERPRET when its kernels are defined, so it is set here, before any test
# imports them: without a GPU, tests/test_triton_*.py run the kernels in the interpreter.
# The suite checks the kernels themselves: the per-call choice between the sparse kernels and
# dense compute (sparsekern.choice, default "probe") would send its small test layers to the dense
# path by timing.  tests/test_choice.py switches it back on where it is the subject.
os.environ.setdefault("SPARSEKERN_AUTO", "off")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seeds, so a failure reproduces."""
    random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return f"torch {torch.__version__}, threads {torch.get_num_threads()}, CI={os.environ.get('CI', '')!r}"


@pytest.fixture
def need_cpp():
    """Skip without a built ``sparsekern._C``; fail instead under ``CI=true`` / ``SPARSEKERN_REQUIRE_CPP=1``."""
    from sparsekern.kernels import cpu as cppmod

    ok, why = cppmod.load_library()
    if not ok:
        if os.environ.get("CI", "").lower() == "true" or os.environ.get("SPARSEKERN_REQUIRE_CPP", "") == "1":
            pytest.fail(f"sparsekern._C is required here (CI / SPARSEKERN_REQUIRE_CPP) but not usable: {why}")
        pytest.skip(f"C++ kernels not built: {why}")
