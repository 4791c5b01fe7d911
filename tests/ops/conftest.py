import pytest
import torch

from tests.support import Target, backend_params


@pytest.fixture(params=backend_params())
def backend(request, monkeypatch) -> Target:
    """The backend under test (every backend in tests.support.BACKENDS, or the one a test's
    parametrization names).  fp32 products in IEEE precision; no SPARSEKERN_BACKEND from outside;
    Triton fills the outputs its kernels must overwrite with NaN, so an unwritten element shows."""
    target = Target(request.param)
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    if target.name == "triton":
        from sparsekern.kernels.triton import _launch

        monkeypatch.setattr(_launch, "FILL_OUTPUTS_WITH_NAN", True)
    yield target
    torch.set_float32_matmul_precision(prev)
