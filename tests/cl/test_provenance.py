"""What a result records about where it ran (backends, commit, CPU ISA) and which metrics it defines."""

import pytest

import sparsekern_cl
from sparsekern_cl.cli import format_summary
from sparsekern_cl.provenance import merge_runs, sparse_compute

TINY = {
    "dataset": "synthetic",
    "synthetic": {"n_classes": 6, "n_train": 16, "n_test": 6, "shape": [1, 6, 6], "noise": 30.0},
    "n_tasks": 3,
    "backbone": "mlp",
    "mlp_hidden": [24],
    "epochs": 1,
    "batch_size": 8,
    "buffer_size": 12,
    "lr": 0.3,
    "progress": False,
    "plots": False,
    "threads": 1,
}


def test_a_sparse_run_records_its_backends_commit_and_isa():
    res = sparsekern_cl.run({**TINY, "method": "er", "sparsity": 0.75, "backend": "cpp"})
    env = res["environment"]
    assert env["layer_runs"] == {"fc1": ["sparse/cpp"]}
    assert env["sparse_compute"] is True and env["not_sparse_compute"] == []
    assert env["cpu_isa"] in ("avx512", "avx2", "generic")
    assert isinstance(env["git"]["commit"], str) and len(env["git"]["commit"]) == 40
    assert isinstance(env["git"]["dirty"], bool)


def test_the_reference_backend_is_flagged_as_not_sparse_compute():
    res = sparsekern_cl.run({**TINY, "method": "er", "sparsity": 0.75, "backend": "reference"})
    env = res["environment"]
    assert env["layer_runs"] == {"fc1": ["sparse/reference"]}
    assert env["sparse_compute"] is False and "reference backend" in env["not_sparse_compute"][0]
    assert "not sparse compute" in format_summary(res)


def test_dense_path_and_dense_models():
    runs = merge_runs([{"fc1": "sparse/cpp", "fc2": "dense/cpp"}, {"fc1": "sparse/cpp", "fc2": None}])
    assert runs == {"fc1": ["sparse/cpp"], "fc2": ["dense/cpp"]}
    ok, why = sparse_compute(runs)
    assert ok is False and why == ["fc2: the automatic choice ran it dense (cpp)"]
    assert sparse_compute({}) == (None, [])
    res = sparsekern_cl.run({**TINY, "method": "finetune"})
    assert res["environment"]["sparse_compute"] is None and res["environment"]["layer_runs"] == {}


@pytest.mark.parametrize("cfg", [{"method": "finetune", "head": "multi"}, {"method": "dst", "sparsity": 0.5}])
def test_fwt_is_not_defined_for_multihead_runs(cfg):
    res = sparsekern_cl.run({**TINY, **cfg})
    assert res["fwt"] == {"task_il": None, "class_il": None}
    assert "not defined" in res["fwt_undefined"]
    assert "FWT not defined" in format_summary(res)


def test_fwt_of_a_single_head_run_is_a_number():
    res = sparsekern_cl.run({**TINY, "method": "finetune"})
    assert all(isinstance(v, float) for v in res["fwt"].values()) and "fwt_undefined" not in res
