"""Bad input gives one clear line, not a traceback: the CLI's errors for devices, output folders,
checkpoints, datasets and backends; a non-finite lr is refused; a diverged run stops with
``complete: false`` and the step, and keeps its last checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch

import sparsekern_cl
from sparsekern_cl import strategies
from sparsekern_cl.cli import main
from tests.cl.test_run import TINY


def _argv(**kw) -> list[str]:
    cfg = {**TINY, "method": "er", "epochs": 1, **kw}
    out = []
    for k, v in cfg.items():
        out += [f"--{k.replace('_', '-')}", v if isinstance(v, str) else json.dumps(v)]
    return out


def _error(capsys, **kw) -> str:
    assert main(_argv(**kw)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_cli_device_errors(capsys):
    assert "device: expected a torch device string" in _error(capsys, device="tpu")
    if not torch.cuda.is_available():
        assert "device: 'cuda' needs CUDA, which is not available" in _error(capsys, device="cuda")


def test_cli_output_dir_is_a_file(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    assert f"output_dir: expected a folder, got the file {str(f)!r}" in _error(capsys, output_dir=str(f))


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage" * 20, "truncated"], ids=["empty", "random", "truncated"])
def test_cli_bad_checkpoint(tmp_path, capsys, content):
    out = tmp_path / "run"
    if content == "truncated":
        assert main(_argv(output_dir=str(out))) == 0
        blob = (out / "checkpoint.pt").read_bytes()
        content = blob[: len(blob) // 2]
    out.mkdir(exist_ok=True)
    (out / "checkpoint.pt").write_bytes(content)
    err = _error(capsys, output_dir=str(out), resume=True)
    assert "resume:" in err and "checkpoint.pt is not a readable sparsekern_cl checkpoint" in err
    assert "weights_only" not in err  # torch's advice to load it unsafely is not repeated


def test_cli_dataset_and_backend_errors(tmp_path, capsys):
    assert "data_dir:" in _error(capsys, dataset="cifar10", data_dir=str(tmp_path / "none"))
    if not torch.cuda.is_available():
        err = _error(capsys, sparsity=0.5, backend="cuda")
        assert "backend 'cuda'" in err


@pytest.mark.parametrize("lr", [math.inf, math.nan, -1.0, 0.0])
def test_lr_must_be_finite_and_positive(lr):
    with pytest.raises(ValueError, match="lr: expected"):
        sparsekern_cl.run({**TINY, "method": "er", "lr": lr})


def test_diverged_loss_stops_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    observe = strategies.Strategy.observe
    calls = []

    def nan_in_task_1(self, x, x_raw, y, task, uid):
        loss = observe(self, x, x_raw, y, task, uid)
        calls.append(task)
        return math.nan if task == 1 else loss

    monkeypatch.setattr(strategies.Strategy, "observe", nan_in_task_1)
    assert main(_argv(output_dir=str(out))) == 1
    assert "diverged at task 1, epoch 0, step 0: the training loss is nan" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] is False and res["tasks_done"] == 1
    assert res["diverged"] == {"task": 1, "epoch": 0, "step": 0, "reason": "the training loss is nan"}
    assert calls.count(1) == 1  # no step after the first non-finite loss
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["state"]["task"] == 1 and not ck["state"]["finished"]  # the one written after task 0
    monkeypatch.setattr(strategies.Strategy, "observe", observe)
    assert main(_argv(output_dir=str(out), resume=True)) == 0  # nothing was lost: it resumes
    assert json.loads((out / "results.json").read_text())["complete"] is True


def test_diverged_weights_stop_the_run(monkeypatch):
    end_epoch = strategies.Strategy.end_epoch

    def poison(self, task, epoch):
        end_epoch(self, task, epoch)
        with torch.no_grad():
            next(self.model.parameters()).view(-1)[0] = math.inf

    monkeypatch.setattr(strategies.Strategy, "end_epoch", poison)
    res = sparsekern_cl.run({**TINY, "method": "er", "epochs": 1})
    assert res["complete"] is False and res["diverged"]["task"] == 0
    assert "is not finite" in res["diverged"]["reason"]
