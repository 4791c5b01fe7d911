import os
import random

import pytest
import torch

# Triton reads TRITON_INTERPRET when its kernels are defined, so it is set here, before any test
# imports them: without a GPU, the Triton backend's tests run the kernels in the interpreter.
# The suite checks the kernels themselves: the per-call choice between the sparse kernels and
# dense compute (sparsekern.choice, default "probe") would send its small test layers to the dense
# path by timing.  tests/test_choice.py switches it back on where it is the subject.
os.environ.setdefault("SPARSEKERN_AUTO", "off")
# Mask caches and backwards also compare a content checksum of the mask (sparsekern.formats), so a
# test that writes a mask behind its version counter gets a rebuild, not a stale answer.
os.environ.setdefault("SPARSEKERN_CHECK_MASKS", "1")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests import support  # noqa: E402  (after TRITON_INTERPRET is set)


def pytest_configure(config):
    for name, req in support.REQUIREMENTS.items():
        strict = " (a failure under SPARSEKERN_STRICT=1 / CI=true)" if req.strict else ""
        config.addinivalue_line("markers", f"{name}: needs {req.what}; skipped without{strict}")


def pytest_collection_modifyitems(config, items):
    support.skip_unmet(items)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    support.check_strict(item)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seeds, so a failure reproduces."""
    random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return (
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, CI={os.environ.get('CI', '')!r}, "
        f"strict={support.STRICT}, backends under test: {', '.join(support.BACKENDS)}"
    )


@pytest.fixture
def need_cpp():
    """Skip without a built ``sparsekern._C``; fail instead under ``SPARSEKERN_STRICT=1`` / ``CI=true``."""
    ok, why = support.cpp_status()
    if not ok:
        if support.STRICT:
            pytest.fail(f"sparsekern._C is required here (SPARSEKERN_STRICT / CI) but not usable: {why}")
        pytest.skip(f"C++ kernels not built: {why}")
