"""An open API: your own backbone and data in run(), logs written as the run goes, mammoth's flag
spellings, console scripts that name themselves (issue 18 item 6)."""

import csv
import importlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsekern
import sparsekern_cl
from sparsekern_cl.config import build_parser
from sparsekern_cl.logs import LOG_COLUMNS, RunLog

from .test_run import TINY

BASE = {"method": "derpp", "epochs": 2, "batch_size": 8, "buffer_size": 10, "lr": 0.3}
BASE.update({k: TINY[k] for k in ("progress", "plots", "threads")})


def _tasks(n: int, seed: int, labels=((0, 1), (2, 3), (4, 5))):
    g = torch.Generator().manual_seed(seed)
    out = []
    for cls in labels:
        y = torch.tensor(cls)[torch.randint(0, len(cls), (n,), generator=g)]
        x = torch.randn(n, 12, generator=g) + 8.0 * nn.functional.one_hot(torch.tensor([c % 12 for c in y]), 12)
        out.append((x, y))
    return out


def _data(labels=((0, 1), (2, 3), (4, 5))):
    return {"train": _tasks(24, 0, labels), "test": _tasks(8, 1, labels)}


def _net(out: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, out))


class PairDataset(torch.utils.data.Dataset):
    """A map-style dataset of (tensor, int) items, as torchvision's are."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_own_model_and_tensors_train_sparse_with_a_dense_head():
    net = _net()
    res = sparsekern_cl.run({**BASE, "sparsity": 0.5}, model=net, scenario=_data())
    assert res["complete"] and res["user_model"] == "Sequential"
    assert isinstance(net[0], sparsekern.SparseLinear)  # trained in place, sparsified
    assert type(net[2]) is nn.Linear  # keep_dense auto: the last nn.Linear (the head) stays dense
    assert res["scenario"]["dataset"] == "custom" and res["scenario"]["source"] == "user data"
    assert res["scenario"]["train_sizes"] == [24, 24, 24] and res["scenario"]["n_tasks"] == 3
    assert all(res["acc_matrix"]["task_il"][t][t] >= 75.0 for t in range(3)), res["acc_matrix"]
    json.dumps(res)


def test_datasets_per_task_equal_tensor_pairs():
    data = _data()
    as_tensors = sparsekern_cl.run(BASE, model=_net(), scenario=data)
    as_datasets = sparsekern_cl.run(
        BASE,
        model=_net(),
        scenario={
            "train": [PairDataset(x, y) for x, y in data["train"]],
            "test": [torch.utils.data.TensorDataset(x, y) for x, y in data["test"]],
        },
    )
    assert as_tensors["acc_matrix"] == as_datasets["acc_matrix"]
    assert as_tensors["train_flops"] == as_datasets["train_flops"]


def test_dense_run_keeps_plain_layers_and_compare_dense_copies_the_module():
    net = _net()
    sparsekern_cl.run({**BASE, "sparsity": 0.0}, model=net, scenario=_data())
    assert not list(sparsekern.sparse_modules(net))
    net = _net()
    res = sparsekern_cl.run({**BASE, "sparsity": 0.5, "compare_dense": True}, model=net, scenario=_data())
    assert "dense_reference" in res and isinstance(net[0], sparsekern.SparseLinear)


def test_own_labels_are_remapped_per_task():
    labels = ((7, 3), (0, 9), (4, 5))
    res = sparsekern_cl.run({**BASE, "epochs": 1}, model=_net(), scenario=_data(labels))
    assert res["scenario"]["class_order"] == [3, 7, 0, 9, 4, 5]
    sc = sparsekern_cl.user_scenario(*_data(labels).values())
    assert [sorted(set(d.y.tolist())) for d in sc.test] == [[0, 1], [2, 3], [4, 5]]


def test_head_size_and_forward_failures_name_the_model():
    with pytest.raises(ValueError, match=r"model: expected logits of shape \[N, 6\].*3 tasks x 2 classes.*\(1, 5\)"):
        sparsekern_cl.run(BASE, model=_net(out=5), scenario=_data())
    with pytest.raises(ValueError, match="model: a forward pass of one training example"):
        sparsekern_cl.run(BASE, model=nn.Linear(7, 6), scenario=_data())
    with pytest.raises(ValueError, match="model: expected a torch.nn.Module, got str"):
        sparsekern_cl.run(BASE, model="mlp", scenario=_data())


def _bad(kind):
    d = _data()
    tr, te = d["train"], d["test"]
    if kind == "float labels":
        tr[1] = (tr[1][0], tr[1][1].float())
    elif kind == "shape":
        te[2] = (te[2][0][:, :5], te[2][1])
    elif kind == "lengths":
        tr[0] = (tr[0][0][:3], tr[0][1])
    elif kind == "shared class":
        tr[2] = (tr[2][0], torch.arange(len(tr[2][1])) % 2 + 1)  # classes 1, 2: task 0 and task 1 have them
    elif kind == "class count":
        tr[1] = (tr[1][0], torch.full_like(tr[1][1], 2))
    elif kind == "test class":
        te[0] = (te[0][0], torch.full_like(te[0][1], 5))
    elif kind == "task count":
        d["test"] = te[:2]
    elif kind == "not a pair":
        tr[1] = tr[1][0]
    return d


@pytest.mark.parametrize(
    "kind, message",
    [
        ("float labels", r"train\[1\]: expected integer labels"),
        ("shape", r"test\[2\]: expected inputs of shape \[N, 12\]"),
        ("lengths", r"train\[0\]: expected as many labels as inputs"),
        ("shared class", r"train\[2\]: expected classes no earlier task has, got \[1, 2\]"),
        ("class count", r"train\[1\]: expected 2 classes"),
        ("test class", r"test\[0\]: expected labels of train\[0\]'s classes \[0, 1\], got \[5\]"),
        ("task count", r"test: expected one entry per training task \(3\), got 2"),
        ("not a pair", r"train\[1\]: expected an \(x, y\) pair of tensors"),
    ],
)
def test_bad_user_data_names_the_argument(kind, message):
    with pytest.raises(ValueError, match=message):
        sparsekern_cl.run(BASE, model=_net(), scenario=_bad(kind))


def test_bad_scenario_argument():
    with pytest.raises(ValueError, match="scenario: expected a sparsekern_cl.Scenario or a dict"):
        sparsekern_cl.run(BASE, model=_net(), scenario=[1, 2])


def _log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_log_csv_has_a_row_per_epoch_and_task_end(tmp_path):
    res = sparsekern_cl.run({**TINY, "method": "er", "output_dir": str(tmp_path)})
    rows = _log(tmp_path / "log.csv")
    assert (tmp_path / "log.csv").read_text().splitlines()[0] == ",".join(LOG_COLUMNS)
    assert [(r["event"], r["task"], r["epoch"]) for r in rows[:3]] == [
        ("epoch", "0", "1"),
        ("epoch", "0", "2"),
        ("task_end", "0", "2"),
    ]
    assert len(rows) == 3 * 2 + 3 and rows[0]["avg_class_il"] == "" and float(rows[0]["loss"]) > 0
    ends = [r for r in rows if r["event"] == "task_end"]
    assert float(ends[-1]["avg_class_il"]) == pytest.approx(res["avg_acc"]["class_il"], abs=1e-3)
    assert float(ends[-1]["avg_task_il"]) == pytest.approx(res["avg_acc"]["task_il"], abs=1e-3)
    epochs = [float(r["epoch_train_s"]) for r in rows if r["event"] == "epoch"]
    assert epochs == pytest.approx([e for t in res["epoch_wall_clock_s"] for e in t], abs=1e-3)
    assert all(float(a["elapsed_s"]) <= float(b["elapsed_s"]) for a, b in zip(rows, rows[1:]))


def test_log_rows_reach_the_disk_at_once(tmp_path):
    log = RunLog(str(tmp_path))
    log.epoch(0, 1, 0.5, 0.01, 1)
    assert _log(tmp_path / "log.csv")[0]["loss"] == "0.5"  # read before close: flushed per row
    log.close()
    assert RunLog(None).epoch(0, 1, 0.5, 0.01, 1) is None  # no output_dir: no files


def test_log_continues_on_resume(tmp_path):
    cfg = {**TINY, "method": "er", "output_dir": str(tmp_path)}
    assert not sparsekern_cl.run({**cfg, "stop_after_epochs": 3})["complete"]
    assert len(_log(tmp_path / "log.csv")) == 4  # 2 epochs + task end + 1 epoch
    assert sparsekern_cl.run({**cfg, "resume": True})["complete"]
    rows = _log(tmp_path / "log.csv")
    assert len(rows) == 9 and [r["event"] for r in rows].count("task_end") == 3


def test_tensorboard_note_when_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    res = sparsekern_cl.run(
        {**TINY, "method": "finetune", "epochs": 1, "output_dir": str(tmp_path), "tensorboard": True}
    )
    assert res["complete"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: tensorboard: true, but torch.utils.tensorboard cannot be")
    with pytest.raises(ValueError, match="tensorboard: expected an output_dir"):
        sparsekern_cl.run({**TINY, "tensorboard": True})


def test_tensorboard_scalars_when_importable(tmp_path, monkeypatch):
    calls = []

    class Writer:
        def __init__(self, logdir):
            calls.append(("open", logdir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    sparsekern_cl.run({**TINY, "method": "finetune", "output_dir": str(tmp_path), "tensorboard": True})
    assert calls[0] == ("open", str(tmp_path / "tensorboard")) and calls[-1] == ("close",)
    assert [s for tag, *s in calls if tag == "train/loss"] == [[1], [2], [3], [4], [5], [6]]
    assert [s for tag, *s in calls if tag == "avg_acc/class_il"] == [[0], [1], [2]]


def test_mammoth_spellings_parse_as_aliases():
    argv = ["--buffer_size", "50", "--n_epochs", "3", "--model", "er", "--minibatch_size", "4"]
    args = vars(build_parser().parse_args(argv))
    assert {k: args[k] for k in ("buffer_size", "epochs", "method", "minibatch_size")} == {
        "buffer_size": 50,
        "epochs": 3,
        "method": "er",
        "minibatch_size": 4,
    }
    assert vars(build_parser().parse_args(["--buffer-size", "50", "--epochs", "3"])) == {
        "config": None,
        "preset": None,
        "buffer_size": 50,
        "epochs": 3,
    }


def _scripts() -> dict[str, str]:
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    section = pyproject.read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]  # no tomllib on 3.10
    pairs = (line.split("=", 1) for line in section.splitlines() if "=" in line)
    return {k.strip(): v.strip().strip('"') for k, v in pairs}


def test_pyproject_declares_the_three_console_scripts():
    assert set(_scripts()) == {"sparsekern-cl", "sparsekern-env", "sparsekern-bench"}


@pytest.mark.parametrize("script", sorted(_scripts()))
def test_console_scripts_print_their_own_names(script, monkeypatch, capsys):
    module, func = _scripts()[script].split(":")
    main = getattr(importlib.import_module(module), func)
    monkeypatch.setattr(sys, "argv", [f"/venv/bin/{script}", "--help"])
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {script} ")
    monkeypatch.setattr(sys, "argv", ["/src/pkg/__main__.py", "--help"])
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m ")


class Wider(nn.Sequential):
    pass


def test_resume_with_own_data_checks_the_model_and_data(tmp_path):
    cfg = {**BASE, "output_dir": str(tmp_path), "save_checkpoints": True}
    assert not sparsekern_cl.run({**cfg, "stop_after_epochs": 3}, model=_net(), scenario=_data())["complete"]
    with pytest.raises(ValueError, match="resume: the checkpoint .* another model or scenario"):
        sparsekern_cl.run({**cfg, "resume": True}, model=Wider(*_net()), scenario=_data())
    with pytest.raises(ValueError, match="resume: the checkpoint .* another model or scenario"):
        sparsekern_cl.run({**cfg, "resume": True}, model=_net(), scenario=_data(((0, 1), (2, 5), (4, 3))))
    resumed = sparsekern_cl.run({**cfg, "resume": True}, model=_net(), scenario=_data())
    straight = sparsekern_cl.run(BASE, model=_net(), scenario=_data())
    assert resumed["complete"] and resumed["acc_matrix"] == straight["acc_matrix"]
