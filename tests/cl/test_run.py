"""End-to-end runs on tiny synthetic data: every strategy, resume after a kill, config errors, CLI."""

import json
import os

import pytest
import torch

import sparsekern_cl
from sparsekern_cl.cli import main
from sparsekern_cl.config import load_config_file, resolve_config

TINY = {
    "dataset": "synthetic",
    "synthetic": {"n_classes": 6, "n_train": 16, "n_test": 6, "shape": [1, 6, 6], "noise": 30.0},
    "n_tasks": 3,
    "backbone": "mlp",
    "mlp_hidden": [24],
    "epochs": 2,
    "batch_size": 8,
    "buffer_size": 12,
    "lr": 0.3,  # high enough that fine-tuning forgets within a few steps
    "progress": False,
    "plots": False,
    "threads": 1,  # tiny shapes: one thread is fastest, and immune to busy shared cores
}


def _run(**kw):
    return sparsekern_cl.run({**TINY, **kw})


@pytest.fixture(scope="module")
def runs():
    return {m: _run(method=m) for m in ("finetune", "joint", "er", "derpp", "ewc")}


@pytest.mark.parametrize("method", ["finetune", "joint", "er", "derpp", "ewc"])
def test_each_strategy_runs_and_reports(runs, method):
    res = runs[method]
    assert res["complete"]
    for s in ("task_il", "class_il"):
        R = res["acc_matrix"][s]
        assert len(R) == 3 and all(len(r) == 3 for r in R)
        assert all(0.0 <= v <= 100.0 for r in R for v in r)
        assert {"task_il", "class_il"} <= set(res["avg_acc"])
    for key in ("bwt", "fwt", "forgetting"):
        assert set(res[key]) == {"task_il", "class_il"}
    # the task just trained is learned (templates are well separated)
    assert all(res["acc_matrix"]["task_il"][t][t] >= 75.0 for t in range(3)), res["acc_matrix"]["task_il"]
    assert res["train_flops"] > 0 and res["train_flops"] == pytest.approx(res["dense_train_flops"])
    assert res["wall_clock_s"] > 0 and len(res["task_wall_clock_s"]) == 3
    assert [len(e) for e in res["epoch_wall_clock_s"]] == [2, 2, 2]
    json.dumps(res)  # results are plain JSON


def test_strategies_cost_what_they_compute(runs):
    f = {m: r["train_flops"] for m, r in runs.items()}
    # one MLP forward per example: 2 * (36*24 + 24*6) FLOPs
    per_fwd = 2 * (36 * 24 + 24 * 6)
    n_train = 16 * 6  # examples over all tasks, 2 epochs each
    # fine-tune: forward + weight grads everywhere + input grad of the head only
    assert f["finetune"] == pytest.approx(2 * n_train * (per_fwd + per_fwd + 2 * 24 * 6))
    assert f["er"] > f["finetune"] and f["derpp"] > f["er"]  # replay passes are counted
    assert f["joint"] > f["finetune"]  # joint revisits earlier tasks' data
    assert f["ewc"] > f["finetune"]  # the Fisher estimate costs per-example passes
    # joint is the upper bound of the Class-IL setting here; fine-tune forgets
    assert runs["joint"]["avg_acc"]["class_il"] > runs["finetune"]["avg_acc"]["class_il"]
    assert runs["finetune"]["bwt"]["class_il"] < 0


def test_sparse_run_counts_fewer_flops():
    res = _run(method="er", sparsity=0.75, backend="reference")
    assert res["environment"]["layer_backends"] == {"fc1": "reference"}
    assert res["layers"]["fc1"]["weight"] == pytest.approx(0.25, abs=0.01)
    assert res["train_flops"] < 0.5 * res["dense_train_flops"]
    assert 0.6 < res["model_sparsity"] < 0.75
    assert res["model_capacity"] == pytest.approx(1 - res["model_sparsity"] + 0.25 / 32)
    assert res["memory_footprint"]["total_bytes"] < res["memory_footprint"]["dense_total_bytes"]


def test_compare_dense_reports_ratio(tmp_path):
    res = _run(method="derpp", sparsity=0.5, compare_dense=True, epochs=1, output_dir=str(tmp_path))
    assert res["dense_reference"]["train_flops"] == pytest.approx(res["dense_train_flops"])
    assert res["wall_clock_ratio"] == pytest.approx(res["dense_reference"]["wall_clock_s"] / res["wall_clock_s"])
    assert os.path.isfile(tmp_path / "results.json")
    assert os.path.isfile(tmp_path / "dense" / "results.json") and os.path.isfile(tmp_path / "sparse" / "results.json")


def test_same_seed_is_bit_identical_other_seed_differs():
    a, b, c = _run(method="derpp", seed=3), _run(method="derpp", seed=3), _run(method="derpp", seed=4)
    assert a["acc_matrix"] == b["acc_matrix"] and a["train_flops"] == b["train_flops"]
    assert a["acc_matrix"] != c["acc_matrix"]


def _final_model(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["model"]


@pytest.mark.parametrize("stop", [3, 2], ids=["mid-task", "task-end"])
def test_resume_after_kill_is_identical(tmp_path, stop):
    cfg = {
        **TINY,
        "method": "derpp",
        "sparsity": 0.5,
        "backend": "reference",
        "augment": True,
        "synthetic": {**TINY["synthetic"], "shape": [1, 8, 8]},
        "checkpoint_every": 1,
    }
    full = sparsekern_cl.run({**cfg, "output_dir": str(tmp_path / "full")})
    out = str(tmp_path / "killed")
    part = sparsekern_cl.run({**cfg, "output_dir": out, "stop_after_epochs": stop})
    assert not part["complete"] and part["tasks_done"] == (1 if stop == 3 else 1)
    resumed = sparsekern_cl.run({**cfg, "output_dir": out, "resume": True})
    assert resumed["complete"]
    assert resumed["acc_matrix"] == full["acc_matrix"]
    assert resumed["train_flops"] == full["train_flops"]
    a, b = _final_model(str(tmp_path / "full")), _final_model(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a finished run resumed again returns its stored results
    again = sparsekern_cl.run({**cfg, "output_dir": out, "resume": True})
    assert again["acc_matrix"] == full["acc_matrix"]
    with pytest.raises(ValueError, match="different configuration.*lr"):
        sparsekern_cl.run({**cfg, "output_dir": out, "resume": True, "lr": 0.5})


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("method", "sparcl9", "method: expected one of"),
        ("dataset", "imagenet", "dataset: expected one of"),
        ("sparsity", 1.0, r"sparsity: expected a number in \[0.0, 1.0\)"),
        ("sparsity", -0.1, "sparsity"),
        ("lr", 0, "lr: expected a number in"),
        ("epochs", 0, "epochs: expected an integer >= 1"),
        ("batch_size", 2.5, "batch_size"),
        ("buffer_size", 0, "buffer_size: expected a positive capacity"),
        ("n_tasks", 4, "n_tasks: expected a divisor"),
        ("mlp_hidden", [10, 0], "mlp_hidden"),
        ("layout", "diagonal", "layout"),
        ("backend", "gpu", "backend"),
        ("head", "many", "head"),
        ("class_order", "random", "class_order"),
        ("resume", True, "resume: expected an output_dir"),
        ("compare_dense", "yes", "compare_dense: expected true or false"),
        ("not_a_key", 1, "unknown keys"),
    ],
)
def test_bad_config_is_rejected(key, value, match):
    with pytest.raises(ValueError, match=match):
        sparsekern_cl.run({**TINY, "method": "er", key: value})


def test_block_layout_needs_block_size():
    with pytest.raises(ValueError, match="block_size"):
        resolve_config({"sparsity": 0.9, "layout": "block"})


def test_config_files_and_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("# a run\nmethod: er\nbuffer_size: 50  # small\nmlp_hidden: [32, 16]\nlr: 0.05\npreset: mnist-mlp\n")
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"method": "ewc", "ewc_lambda": 3}))
    assert load_config_file(str(y))["mlp_hidden"] == [32, 16]
    cfg = resolve_config({"config": str(y), "lr": 0.2})
    assert (cfg["method"], cfg["buffer_size"], cfg["lr"], cfg["batch_size"]) == ("er", 50, 0.2, 10)
    assert resolve_config({"config": str(j)})["ewc_lambda"] == 3.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: er\nbogus: 1\n")
    with pytest.raises(ValueError, match="unknown keys.*bogus"):
        resolve_config({"config": str(bad)})
    with pytest.raises(ValueError, match="preset"):
        resolve_config({"preset": "nope"})


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        "--method",
        "er",
        "--dataset",
        "synthetic",
        "--synthetic",
        json.dumps(TINY["synthetic"]),
        "--n-tasks",
        "3",
        "--mlp-hidden",
        "[24]",
        "--epochs",
        "1",
        "--buffer-size",
        "12",
        "--batch-size",
        "8",
        "--progress",
        "false",
        "--output-dir",
        str(out),
        "--sparsity",
        "0.5",
        "--compare-dense",
        "--threads",
        "1",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "dense" in text and "50% sp." in text and "wall-clock ratio" in text
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["method"] == "er" and "wall_clock_ratio" in res
    assert (out / "sparse" / "acc_matrix.png").stat().st_size > 0
    assert (out / "sparse" / "acc_over_time.png").stat().st_size > 0
    assert main(["--method", "nope"]) == 2
    assert "method: expected one of" in capsys.readouterr().err


def test_plugin_hooks_are_called_in_order():
    calls = []

    class Spy(sparsekern_cl.Plugin):
        def begin_task(self, s, t):
            calls.append(("begin_task", t))

        def train_indices(self, s, t, e, idx):
            calls.append(("train_indices", t, e))
            return idx[: len(idx) // 2]  # remove half the examples

        def select_batch(self, s, ctx):
            calls.append("select_batch")
            return ctx

        def after_backward(self, s, ctx):
            calls.append("after_backward")
            assert all(p.grad is not None for p in s.model.parameters())
            # an extra SAM-like pass reuses the same replay samples
            s.loss(ctx).backward()

        def after_step(self, s, ctx):
            calls.append("after_step")
            assert ctx.logits.shape[0] == ctx.uid.shape[0]

        def end_epoch(self, s, t, e):
            calls.append(("end_epoch", t, e))

        def end_task(self, s, t):
            calls.append(("end_task", t))

    sparsekern_cl.register_method("er_spy", "er", lambda cfg, model, scenario: [Spy()])
    try:
        res = _run(method="er_spy", n_tasks=3, epochs=1)
    finally:
        sparsekern_cl.STRATEGIES.pop("er_spy")
    base = _run(method="er", epochs=1)
    assert calls[0] == ("begin_task", 0) and calls[1] == ("train_indices", 0, 0)
    assert calls.count("select_batch") == calls.count("after_step") == 3 * 2  # 16 of 32 examples, batch 8
    assert [c for c in calls if isinstance(c, tuple) and c[0] == "end_task"] == [("end_task", t) for t in range(3)]
    # half the data but an extra pass per step: both show in the counted FLOPs
    assert res["train_flops"] != base["train_flops"]


def test_resnet18_backbone_sizes_and_tiny_sparse_run():
    from sparsekern_cl.backbones import build_backbone

    full = build_backbone("resnet18", (3, 32, 32), 10, nf=64)
    assert sum(p.numel() for p in full.parameters()) == 11_173_962  # the CL literature's ResNet-18
    res = _run(
        method="derpp",
        backbone="resnet18",
        nf=4,
        epochs=1,
        sparsity=0.5,
        batch_size=8,
        synthetic={**TINY["synthetic"], "shape": [3, 8, 8]},
        augment=True,
    )
    assert res["complete"]
    names = set(res["environment"]["layer_backends"])
    assert "conv1" not in names and "head" not in names and "layer1.0.conv1" in names  # stem, head dense
    assert res["train_flops"] < res["dense_train_flops"]


def test_rescale_skips_layers_that_feed_a_batch_norm():
    # under batch norm a larger weight changes no output and only lowers the effective learning rate
    from torch import nn

    from sparsekern_cl.backbones import ResNet18, batchnormed_layers, build_backbone, sparsify_backbone

    net = ResNet18(10, nf=4, in_channels=1)
    normed = batchnormed_layers(net)
    assert {"conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.shortcut.0"} <= normed and "head" not in normed
    before = {n: m.weight.detach().clone() for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    sparsify_backbone(net, 0.9, rescale=True)
    conv = net.layer2[0].conv1
    kept = conv.weight_mask.bool()
    assert torch.equal(conv.weight.detach()[kept], before["layer2.0.conv1"][kept])  # not rescaled
    mlp = build_backbone("mlp", (1, 4, 4), 4, hidden=(50,))
    first = next(n for n, m in mlp.named_modules() if isinstance(m, nn.Linear))
    w0 = mlp.get_submodule(first).weight.detach().clone()
    sparsify_backbone(mlp, 0.9, rescale=True, keep_dense=[])
    w1 = mlp.get_submodule(first).weight.detach()
    kept = w1 != 0
    assert float(w1[kept].abs().mean()) > 1.5 * float(w0[kept].abs().mean())  # no batch norm: rescaled


def test_multihead_trains_each_task_slice():
    res = _run(method="finetune", head="multi")
    # with separate heads, fine-tuning cannot push old tasks' logits down inside their own slice
    assert res["acc_matrix"]["task_il"][2][0] >= 75.0
    single = _run(method="finetune")
    assert res["acc_matrix"] != single["acc_matrix"]


def test_warm_up_changes_no_result(monkeypatch):
    """The untimed warm-up before training (runner._warm_up) leaves every result as it was."""
    from sparsekern_cl import runner

    calls = []
    real = runner._warm_up
    monkeypatch.setattr(runner, "_warm_up", lambda *a: calls.append(1) or real(*a))
    warm = _run(method="derpp", sparsity=0.5)
    monkeypatch.setattr(runner, "_warm_up", lambda *a: None)
    cold = _run(method="derpp", sparsity=0.5)
    assert calls == [1]
    assert warm["acc_matrix"] == cold["acc_matrix"]
    assert warm["train_flops"] == cold["train_flops"]


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_derpp_one_pass_matches_three_passes(sparsity):
    """DER++ on a backbone without batch norm runs one forward pass over the current batch and
    both replay samples: the same loss and gradients as three separate passes."""
    from sparsekern_cl.runner import build_run
    from sparsekern_cl.strategies import StepContext

    cfg = resolve_config({**TINY, "method": "derpp", "sparsity": sparsity})
    scenario, model, strategy, _ = build_run(cfg)
    assert strategy._one_pass()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 6, 6, generator=g)
    y = torch.randint(0, 2, (8,), generator=g)
    rl = (torch.randn(5, 1, 6, 6, generator=g), None, torch.randn(5, 6, generator=g), torch.zeros(5, dtype=torch.long))
    rb = (
        torch.randn(7, 1, 6, 6, generator=g),
        torch.randint(0, 2, (7,), generator=g),
        None,
        torch.zeros(7, dtype=torch.long),
    )
    results = []
    for one in (True, False):
        strategy._one_pass_ok = one
        model.zero_grad(set_to_none=True)
        ctx = StepContext(x=x, x_raw=x, y=y, task=0, uid=torch.arange(8), step=0)
        ctx.extra.update(replay_logits=rl, replay_labels=rb)
        loss = strategy.loss(ctx)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((loss.detach(), ctx.logits, grads))
    (l1, z1, g1), (l3, z3, g3) = results
    torch.testing.assert_close(l1, l3)
    torch.testing.assert_close(z1, z3)
    assert len(g1) == len(g3) > 0
    for a, b in zip(g1, g3):
        torch.testing.assert_close(a, b)


def test_derpp_keeps_three_passes_with_batch_norm():
    from sparsekern_cl.runner import build_run

    cfg = resolve_config(
        {
            **TINY,
            "method": "derpp",
            "backbone": "resnet18",
            "nf": 4,
            "synthetic": {**TINY["synthetic"], "shape": [3, 8, 8]},
        }
    )
    _, _, strategy, _ = build_run(cfg)
    assert not strategy._one_pass()


def test_sparse_optimizer_matches_torch_optim_on_fixed_masks():
    """With fixed masks and no weight decay the sparse-aware step (the default) gives the stock
    optimizer's results bit for bit; a dense run keeps torch.optim."""
    import sparsekern
    from sparsekern_cl.runner import build_run

    for momentum in (0.0, 0.9):
        kw = {"method": "derpp", "sparsity": 0.5, "momentum": momentum, "epochs": 1}
        fast, stock = _run(**kw), _run(**kw, sparse_optimizer=False)
        assert fast["acc_matrix"] == stock["acc_matrix"]
    _, _, strategy, _ = build_run(resolve_config({**TINY, "sparsity": 0.5}))
    assert isinstance(strategy.make_optimizer(), sparsekern.optim.SGD)
    _, _, strategy, _ = build_run(resolve_config({**TINY, "sparsity": 0.0}))
    assert type(strategy.make_optimizer()) is torch.optim.SGD


def test_summary_says_what_each_sparse_layer_ran_on():
    """The CLI's "sparse layers ran on" line comes from the per-layer record: a layer the automatic
    choice ran dense is counted as such, not reported as the selected backend."""
    from sparsekern_cl.cli import _ran_on

    assert _ran_on({"layer_runs": {"a": ["sparse/cpp"], "b": ["sparse/cpp"]}}) == ["cpp"]
    mixed = {"layer_runs": {"a": ["sparse/cpp"], "b": ["dense/dense"], "c": ["sparse/cpp"]}}
    assert _ran_on(mixed) == ["cpp (2 layers)", "dense (1 layer, the automatic choice)"]
    assert _ran_on({"layer_backends": {"a": "cpp"}}) == ["cpp"]  # results without the per-layer record


def test_compact_gradients_change_nothing_but_the_layout(monkeypatch):
    """A sparse DER++ run with the compact gradient layout (the default) gives the same results,
    bit for bit, as with the dense layout; a method that reads weight.grad keeps the dense one."""
    from sparsekern_cl import strategies

    seen = []
    make = strategies.Strategy.make_optimizer

    def spy(self):
        seen.append(self.grad_layout())
        return make(self)

    monkeypatch.setattr(strategies.Strategy, "make_optimizer", spy)
    kw = {"method": "derpp", "sparsity": 0.8}
    on, off = _run(**kw), _run(**kw, compact_grads=False)
    assert seen[0] == "compact" and set(seen[1:]) <= {"compact", "dense"} and seen[-1] == "dense"
    assert on["acc_matrix"] == off["acc_matrix"]
    assert on["train_flops"] == off["train_flops"]
    seen.clear()
    _run(method="ewc", sparsity=0.8)
    assert seen and set(seen) == {"dense"}
