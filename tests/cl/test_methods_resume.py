"""A sparse CL run (SparCL, DST, EsaCL) killed midway resumes from its last checkpoint to the same result."""

import pytest

import sparsekern_cl

TINY = {
    "dataset": "synthetic",
    "synthetic": {"n_classes": 6, "n_train": 16, "n_test": 6, "shape": [1, 6, 6], "noise": 30.0},
    "n_tasks": 3,
    "backbone": "mlp",
    "mlp_hidden": [24, 24],
    "epochs": 2,
    "batch_size": 8,
    "buffer_size": 12,
    "lr": 0.1,
    "sparsity": 0.5,
    "checkpoint_every": 1,
    "progress": False,
    "plots": False,
    "threads": 1,
}


@pytest.mark.parametrize("method", ["sparcl_derpp", "dst", "esacl_derpp"])
def test_killed_run_resumes_to_identical_results(tmp_path, method):
    cfg = {**TINY, "method": method}
    full = sparsekern_cl.run({**cfg, "output_dir": str(tmp_path / "full")})
    out = str(tmp_path / "killed")
    part = sparsekern_cl.run({**cfg, "output_dir": out, "stop_after_epochs": 3})  # dies inside task 2
    assert not part["complete"]
    resumed = sparsekern_cl.run({**cfg, "output_dir": out, "resume": True})
    assert resumed["complete"]
    assert resumed["acc_matrix"] == full["acc_matrix"]
    assert resumed["train_flops"] == full["train_flops"]
    assert resumed["avg_acc"] == full["avg_acc"]
