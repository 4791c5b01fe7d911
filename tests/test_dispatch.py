"""Backend registry and dispatch; import hygiene; environment report; the demo."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import sparsekern as sk
from sparsekern import _backends
from sparsekern.reference import ReferenceBackend
from sparsekern.testing import assert_close, make_mask


class RecordingBackend(ReferenceBackend):
    """The reference maths, recording which entry points ran."""

    def __init__(self, name):
        self.name = name
        self.calls = []

    def linear_fwd(self, *a):
        self.calls.append("fwd")
        return super().linear_fwd(*a)

    def linear_dx(self, *a):
        self.calls.append("dx")
        return super().linear_dx(*a)

    def linear_dw(self, *a):
        self.calls.append("dw")
        return super().linear_dw(*a)


class RefusingBackend(ReferenceBackend):
    def __init__(self, name, why):
        self.name, self.why = name, why

    def supports(self, info):
        return False, self.why


@pytest.fixture
def slot():
    """Temporarily replace a backend slot; restores the original afterwards."""
    saved = dict(_backends._INSTANCES)
    logged = set(_backends._LOGGED)

    def install(name, backend):
        _backends.register_backend(name, backend)
        return backend

    yield install
    _backends._INSTANCES.clear()
    _backends._INSTANCES.update(saved)
    _backends._LOGGED.clear()
    _backends._LOGGED.update(logged)


def _linear_args():
    w = torch.randn(6, 5, requires_grad=True)
    return torch.randn(3, 5, requires_grad=True), w, make_mask(w.shape, "random", 0.5)


def test_forward_and_backward_run_on_the_same_backend(slot, monkeypatch):
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    rec = slot("cpp", RecordingBackend("cpp"))
    x, w, m = _linear_args()
    sk.sparse_linear(x, w, None, m).sum().backward()  # automatic order on CPU: cpp first
    assert rec.calls == ["fwd", "dx", "dw"]


def test_precedence_argument_then_env_then_auto(slot, monkeypatch):
    rec_cpp = slot("cpp", RecordingBackend("cpp"))
    rec_ref = slot("reference", RecordingBackend("reference"))
    x, w, m = _linear_args()
    monkeypatch.setenv("SPARSEKERN_BACKEND", "reference")
    sk.sparse_linear(x, w, None, m)
    assert rec_ref.calls == ["fwd"] and rec_cpp.calls == []
    sk.sparse_linear(x, w, None, m, backend="cpp")  # the argument beats the environment
    assert rec_cpp.calls == ["fwd"]
    monkeypatch.setenv("SPARSEKERN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SPARSEKERN_BACKEND"):
        sk.sparse_linear(x, w, None, m)
    with pytest.raises(ValueError, match="backend: expected one of"):
        sk.sparse_linear(x, w, None, m, backend="bogus")


def test_explicit_backend_that_cannot_run_raises_with_reason(slot, monkeypatch):
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    slot("cpp", RefusingBackend("cpp", "float16 is not supported by this test backend"))
    x, w, m = _linear_args()
    with pytest.raises(sk.BackendError, match="float16 is not supported"):
        sk.sparse_linear(x, w, None, m, backend="cpp")
    monkeypatch.setenv("SPARSEKERN_BACKEND", "cpp")
    with pytest.raises(sk.BackendError, match="from SPARSEKERN_BACKEND"):
        sk.sparse_linear(x, w, None, m)


class OpRefusingBackend(RecordingBackend):
    """Runs every op but ``refused``; records the ``CallInfo.op`` of each verdict."""

    def __init__(self, name, refused):
        super().__init__(name)
        self.refused, self.ops = refused, []

    def supports(self, info):
        self.ops.append(info.op)
        return (False, f"no {info.op} here") if info.op == self.refused else (True, "")


def _call(op, backend=None):
    x, w, m = _linear_args()
    if op == "linear":
        return sk.sparse_linear(x, w, None, m, backend=backend)
    if op == "spmm":
        return sk.spmm(x, w, m, backend=backend)
    return sk.sddmm(torch.randn(6, 3), torch.randn(3, 5), m, backend=backend)


@pytest.mark.parametrize("refused", ["spmm", "sddmm", "linear"])
def test_spmm_and_sddmm_dispatch_as_their_own_ops(slot, monkeypatch, refused):
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    be = slot("cpp", OpRefusingBackend("cpp", refused))
    for op in ("linear", "spmm", "sddmm"):
        if op == refused:
            with pytest.raises(sk.BackendError, match=f"cannot run sparsekern.{op} .*no {op} here"):
                _call(op, backend="cpp")
        else:
            _call(op, backend="cpp")
    assert be.ops == ["linear", "spmm", "sddmm"]
    # the automatic order falls through to the reference for the refused op only
    be.calls.clear()
    torch.manual_seed(1)
    y = _call(refused)
    torch.manual_seed(1)
    assert_close(y, _call(refused, backend="reference"))
    assert be.calls == []


def test_cuda_backends_refuse_cpu_tensors_with_reason(monkeypatch):
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    x, w, m = _linear_args()
    with pytest.raises(sk.BackendError, match="backend 'cuda'"):
        sk.sparse_linear(x, w, None, m, backend="cuda")


def test_automatic_order_falls_through_and_logs_once(slot, monkeypatch, caplog):
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    slot("cpp", RefusingBackend("cpp", "a reason worth logging"))
    x, w, m = _linear_args()
    with caplog.at_level(logging.WARNING, logger="sparsekern"):
        y1 = sk.sparse_linear(x, w, None, m)
        y2 = sk.sparse_linear(x, w, None, m)
    hits = [r for r in caplog.records if "a reason worth logging" in r.getMessage()]
    assert len(hits) == 1
    assert_close(y1, y2)


def test_unknown_slot_rejected():
    with pytest.raises(ValueError, match="name: expected one of"):
        _backends.register_backend("opencl", ReferenceBackend())


def _run_py(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_import_needs_no_triton_and_never_initialises_cuda():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail
        "import torch, sparsekern as sk\n"
        "assert 'triton' not in sys.modules or sys.modules['triton'] is None\n"
        "layer = sk.SparseLinear(8, 4, sparsity=0.5)\n"
        "layer(torch.randn(2, 8)).sum().backward()\n"
        "sk.sparse_conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), None, torch.ones(3, 2, 3, 3, dtype=torch.bool))\n"
        "assert not torch.cuda.is_initialized(), 'CUDA was initialised'\n"
        "print('ok')\n"
    )
    r = _run_py(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")


def test_env_report_lists_backends_and_dispatch():
    r = subprocess.run([sys.executable, "-m", "sparsekern.env", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["torch"] == torch.__version__
    assert set(info["backends"]) == set(sk.BACKEND_NAMES)
    assert info["backends"]["reference"]["available"] is True
    ops = {(row["op"], row["layout"]) for row in info["dispatch"] if row["device"] == "cpu"}
    assert ops == {(op, layout) for op in _backends.OPS for layout in ("unstructured", "block")}
    assert set(_backends.OPS) == {"linear", "conv2d", "spmm", "sddmm"}
    assert all(row["chosen"] in ("cpp", "reference") for row in info["dispatch"] if row["device"] == "cpu")
    text = subprocess.run([sys.executable, "-m", "sparsekern.env"], capture_output=True, text=True, timeout=300)
    assert "dispatch" in text.stdout and "reference" in text.stdout


def test_demo_trains_and_keeps_density():
    from sparsekern import demo

    out = demo.main(["--steps", "40", "--sparsity", "0.9"])
    assert out["last_loss"] < out["first_loss"]
    assert all(abs(d - 0.1) < 0.01 for d in out["densities"].values())
    assert 0.0 <= out["accuracy"] <= 1.0
