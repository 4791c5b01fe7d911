"""SparCL: CWI and mask updates on hand-checkable layers, DDR, DGM, presets, ablation flags, resume."""

import pytest
import torch

import sparsekern
import sparsekern_cl
from sparsekern_cl.config import resolve_config
from sparsekern_cl.methods.sparcl import (
    DynamicDataRemoval,
    DynamicGradientMasking,
    TaskAwareDynamicMasking,
    continual_weight_importance,
    expand_mask,
    removal_schedule,
    select_removal,
    shrink_and_expand,
    shrink_mask,
    top_gradient_mask,
)
from sparsekern_cl.runner import build_run
from sparsekern_cl.strategies import StepContext

TINY = {
    "dataset": "synthetic",
    "synthetic": {"n_classes": 6, "n_train": 16, "n_test": 6, "shape": [1, 6, 6], "noise": 30.0},
    "n_tasks": 3,
    "backbone": "mlp",
    "mlp_hidden": [24],
    "epochs": 3,
    "batch_size": 8,
    "buffer_size": 12,
    "lr": 0.3,
    "progress": False,
    "plots": False,
    "sparsity": 0.75,
    "sparcl_delta": 1,
    "sparcl_warmup": 1,
    "sparcl_ddr_cutoff": 2,
    "sparcl_dgm_interval": 3,
    "sparcl_shrink": 0.1,
    "sparcl_expand": 0.1,
    "sparcl_importance_samples": 16,
}


def _setup(**kw):
    cfg = resolve_config({**TINY, "method": "sparcl_derpp", **kw})
    scenario, model, strategy, counter = build_run(cfg)
    return cfg, scenario, model, strategy


def _plugin(strategy, cls):
    return next(p for p in strategy.plugins if isinstance(p, cls))


# --------------------------------------------------------------------------- pure mask rules
def test_cwi_is_magnitude_plus_weighted_gradient_magnitudes():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    gc = torch.tensor([[-1.0, 0.0], [2.0, 4.0]])
    gb = torch.tensor([[0.0, -3.0], [1.0, 1.0]])
    cwi = continual_weight_importance(w, gc, gb, alpha=0.5, beta=2.0)
    assert torch.equal(cwi, torch.tensor([[1.5, 8.0], [3.5, 4.0]]))
    assert torch.equal(continual_weight_importance(w, None, gb, 0.5, 0.0), w.abs())


def test_shrink_and_expand_swaps_the_lowest_for_random_unused():
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 9.0, 9.0, 9.0, 9.0]])
    new, n = shrink_and_expand(mask, score, 0.5, torch.Generator().manual_seed(0))
    assert n == 2 and int(new.sum()) == 4  # sparsity held exactly
    assert new[0, 0] and new[0, 2] and not new[0, 1] and not new[0, 3]  # the two lowest removed
    assert int(new[0, 4:].sum()) == 2  # regrown among the previously unused only


def test_expand_then_shrink_returns_to_the_target_count():
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[:, :2] = True  # 20 active, 80 unused
    big = expand_mask(mask, 0.25, g)
    assert int(big.sum()) == 40 and bool((big & mask).sum() == 20)
    score = torch.arange(100.0).view(10, 10)
    small = shrink_mask(big, score, 20)
    assert int(small.sum()) == 20 and not bool((small & ~big).any())
    kept = score[small]
    assert float(kept.min()) >= float(score[big & ~small].max())  # the highest-score entries survive


def test_top_gradient_mask_is_inside_the_weight_mask():
    mask = torch.tensor([True, True, True, True, True, False])
    score = torch.tensor([5.0, 1.0, 4.0, 3.0, 2.0, 100.0])
    g = top_gradient_mask(mask, score, 0.4)
    assert g.tolist() == [True, False, True, True, False, False]


def test_removal_schedule_sums_to_the_ratio_in_equal_steps():
    assert removal_schedule(1000, 0.3, 4) == [75, 75, 75, 75]
    assert sum(removal_schedule(33, 0.3, 4)) == round(0.3 * 33)


def test_select_removal_takes_the_easiest_and_spares_infinite():
    counts = torch.tensor([3.0, 0.0, 1.0, 0.0, float("inf"), 2.0])
    kept = torch.tensor([True, True, True, False, True, True])
    gone = select_removal(counts, kept, 2, torch.Generator().manual_seed(0))
    assert sorted(gone.tolist()) == [1, 2]  # position 3 is already removed
    gone = select_removal(counts, kept, 5, torch.Generator().manual_seed(0))
    assert 4 not in gone.tolist() and len(gone) == 4


# --------------------------------------------------------------------------- TDM on a real layer
def test_tdm_updates_hold_sparsity_and_regrow_at_zero():
    cfg, scenario, model, strategy = _setup(sparcl_ddr=False, sparcl_dgm=False)
    tdm = _plugin(strategy, TaskAwareDynamicMasking)
    layer = model.fc1
    target = int(layer.weight_mask.sum())
    assert target == round(0.25 * layer.weight.numel())
    strategy.begin_task(0)
    for b in range(2):  # fill the buffer and give weights non-zero values
        x_raw = scenario.train[0].x[b * 8 : (b + 1) * 8]
        strategy.observe(
            strategy.transform(x_raw),
            x_raw,
            scenario.train[0].y[b * 8 : (b + 1) * 8],
            0,
            scenario.train[0].uid[b * 8 : (b + 1) * 8],
        )
    old = layer.weight_mask.clone()
    with torch.no_grad():
        layer.weight.add_(1.0)  # values outside M become non-zero: regrowth must zero them
    tdm.end_epoch(strategy, 0, 0)  # intra-task shrink-and-expand
    new = layer.weight_mask
    grown = new & ~old
    assert int(new.sum()) == target
    assert int(grown.sum()) == round(0.1 * target)
    assert tdm.history[-1]["kind"] == "shrink_expand" and tdm.history[-1]["regrown"] == int(grown.sum())
    assert int((old & ~new).sum()) == round(0.1 * target)
    assert bool((layer.weight[grown] == 0).all())
    assert bool((layer.weight[~new] == 0).all())
    # task switch: expand by λ of the unused weights, then shrink back by CWI after the warm-up
    strategy.end_task(0)
    strategy.begin_task(1)
    unused = layer.weight.numel() - target
    assert int(layer.weight_mask.sum()) == target + round(0.1 * unused)
    assert tdm.in_warmup
    tdm.end_epoch(strategy, 1, 0)
    assert int(layer.weight_mask.sum()) == target and not tdm.in_warmup
    assert int(model.fc1.grad_mask.sum()) <= target and not bool((model.fc1.grad_mask & ~model.fc1.weight_mask).any())


def test_tdm_removes_the_weights_of_lowest_cwi():
    cfg, scenario, model, strategy = _setup(
        sparcl_ddr=False, sparcl_dgm=False, sparcl_cwi_alpha=0.0, sparcl_cwi_beta=0.0, sparcl_shrink=0.2
    )
    tdm = _plugin(strategy, TaskAwareDynamicMasking)
    strategy.begin_task(0)
    layer = model.fc1
    old = layer.weight_mask.clone()
    mag = layer.weight.detach().abs().clone()
    tdm.end_epoch(strategy, 0, 0)  # α = β = 0: CWI is |w|
    removed = old & ~layer.weight_mask
    kept_old = old & layer.weight_mask
    assert int(removed.sum()) == round(0.2 * int(old.sum()))
    assert float(mag[removed].max()) <= float(mag[kept_old].min())


# --------------------------------------------------------------------------- DDR
def _feed(ddr, strategy, task, wrong_uids):
    data = strategy.scenario.train[task]
    logits = torch.full((len(data), strategy.scenario.n_classes), -5.0)
    logits[torch.arange(len(data)), data.y] = 5.0
    wrong = torch.isin(data.uid, wrong_uids)
    logits[wrong] = -logits[wrong]  # these are misclassified
    ctx = StepContext(x=data.x.float(), x_raw=data.x, y=data.y, task=task, uid=data.uid, step=0, logits=logits)
    ddr.after_step(strategy, ctx)


def test_ddr_keeps_the_hardest_and_removes_the_ratio_by_the_cutoff():
    cfg, scenario, model, strategy = _setup(sparcl_ddr_ratio=0.5, sparcl_ddr_cutoff=2, epochs=4)
    ddr = _plugin(strategy, DynamicDataRemoval)
    data = scenario.train[0]
    n = len(data)
    ddr.begin_task(strategy, 0)
    hard = data.uid[: n // 2]
    _feed(ddr, strategy, 0, hard)
    ddr.end_epoch(strategy, 0, 0)
    kept = ddr.train_indices(strategy, 0, 1, torch.arange(n))
    assert len(kept) == n - round(0.25 * n)
    assert set(data.uid[: n // 2].tolist()) <= set(data.uid[kept].tolist())  # misclassified ones stay
    _feed(ddr, strategy, 0, hard)
    ddr.end_epoch(strategy, 0, 1)
    kept = ddr.train_indices(strategy, 0, 2, torch.arange(n))
    assert len(kept) == n - round(0.5 * n)  # the whole ratio is gone by the cutoff stage
    assert sorted(data.uid[kept].tolist()) == sorted(hard.tolist())
    _feed(ddr, strategy, 0, hard[:1])
    ddr.end_epoch(strategy, 0, 2)  # after the cutoff: nothing more is removed
    assert len(ddr.train_indices(strategy, 0, 3, torch.arange(n))) == n - round(0.5 * n)


def test_ddr_forgetting_count_keeps_never_learned_examples():
    cfg, scenario, model, strategy = _setup(sparcl_ddr_count="forgetting", sparcl_ddr_ratio=0.9, sparcl_ddr_cutoff=1)
    ddr = _plugin(strategy, DynamicDataRemoval)
    data = scenario.train[0]
    ddr.begin_task(strategy, 0)
    never = data.uid[:5]
    _feed(ddr, strategy, 0, never)
    _feed(ddr, strategy, 0, never)
    ddr.end_epoch(strategy, 0, 0)
    kept = ddr.train_indices(strategy, 0, 1, torch.arange(len(data)))
    assert set(never.tolist()) <= set(data.uid[kept].tolist())


# --------------------------------------------------------------------------- DGM
def test_dgm_gradient_mask_is_a_subset_and_gradients_outside_are_exactly_zero():
    cfg, scenario, model, strategy = _setup(
        sparcl_tdm=False, sparcl_ddr=False, sparcl_dgm_drop=0.5, sparcl_dgm_interval=100
    )
    dgm = _plugin(strategy, DynamicGradientMasking)
    strategy.begin_task(0)
    data = scenario.train[0]
    seen_grads = {}

    def grab(strategy_, ctx):
        seen_grads["g"] = model.fc1.weight.grad.clone()

    dgm_after = dgm.after_backward
    for step in range(2):
        sl = slice(step * 8, step * 8 + 8)
        dgm.after_backward = lambda s, c: (dgm_after(s, c), grab(s, c))
        strategy.observe(strategy.transform(data.x[sl]), data.x[sl], data.y[sl], 0, data.uid[sl])
    layer = model.fc1
    m, g = layer.weight_mask, layer.grad_mask
    assert not bool((g & ~m).any())
    assert int(g.sum()) == int(m.sum()) - round(0.5 * int(m.sum()))
    # the second step ran with the refreshed G: the kernel wrote exact zeros outside it
    grad = seen_grads["g"]
    assert bool((grad[~g] == 0).all()) and bool((grad[g] != 0).any())
    assert dgm.refreshes == 1


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("preset", ["sparcl-paper", "sparcl-official"])
@pytest.mark.parametrize("method", ["sparcl_er", "sparcl_derpp"])
def test_each_preset_runs_end_to_end(preset, method):
    res = sparsekern_cl.run(
        {
            **TINY,
            "method": method,
            "preset": preset,
            "sparcl_layers": "mlp_hidden",
            "lr": 0.3,
            "batch_size": 8,
            "epochs": 3,
        }
    )
    assert res["complete"]
    assert res["layers"]["fc1"]["weight"] == pytest.approx(0.25, abs=1e-9)  # sparsity held at the end
    assert res["layers"]["fc1"]["grad"] < 0.25
    assert res["train_flops"] < 0.5 * res["dense_train_flops"]
    assert all(res["acc_matrix"]["task_il"][t][t] >= 60.0 for t in range(3)), res["acc_matrix"]


def test_ablation_flags_change_what_they_claim():
    runs = {
        name: sparsekern_cl.run({**TINY, "method": "sparcl_derpp", **kw})
        for name, kw in {
            "static": dict(sparcl_tdm=False, sparcl_ddr=False, sparcl_dgm=False),
            "tdm": dict(sparcl_ddr=False, sparcl_dgm=False),
            "tdm_ddr": dict(sparcl_dgm=False),
            "tdm_dgm": dict(sparcl_ddr=False),
            "all": {},
        }.items()
    }
    # TDM alone keeps the same sparsity and gradient density as the static mask
    assert runs["tdm"]["layers"]["fc1"] == runs["static"]["layers"]["fc1"]
    # DDR removes examples: fewer FLOPs, the same per-example densities
    assert runs["tdm_ddr"]["train_flops"] < runs["tdm"]["train_flops"]
    # DGM shrinks the gradient mask, so the weight-gradient FLOPs drop
    wg = {k: r["flops_breakdown"]["counted"]["weight_grad"] for k, r in runs.items()}
    assert wg["tdm_dgm"] < wg["tdm"]
    assert runs["tdm_dgm"]["layers"]["fc1"]["grad"] < runs["tdm_dgm"]["layers"]["fc1"]["weight"]
    assert runs["all"]["train_flops"] < min(runs["tdm_ddr"]["train_flops"], runs["tdm_dgm"]["train_flops"])


def test_tdm_off_keeps_the_initial_mask():
    cfg, scenario, model, strategy = _setup(sparcl_tdm=False, sparcl_ddr=False, sparcl_dgm=False)
    init = model.fc1.weight_mask.clone()
    assert not any(isinstance(p, TaskAwareDynamicMasking) for p in strategy.plugins)
    res = sparsekern_cl.run(
        {
            **TINY,
            "method": "sparcl_derpp",
            "sparcl_tdm": False,
            "sparcl_ddr": False,
            "sparcl_dgm": False,
            "output_dir": None,
        }
    )
    assert res["layers"]["fc1"]["weight"] == pytest.approx(float(init.float().mean()))


def test_dense_sparcl_is_its_base_strategy():
    a = sparsekern_cl.run({**TINY, "method": "sparcl_derpp", "sparsity": 0.0})
    b = sparsekern_cl.run({**TINY, "method": "derpp", "sparsity": 0.0})
    assert a["acc_matrix"] == b["acc_matrix"] and a["train_flops"] == b["train_flops"]


def test_resume_after_a_stop_is_exact(tmp_path):
    cfg = {**TINY, "method": "sparcl_derpp", "output_dir": str(tmp_path / "r")}
    full = sparsekern_cl.run({**cfg, "output_dir": str(tmp_path / "full")})
    part = sparsekern_cl.run({**cfg, "stop_after_epochs": 4})
    assert not part["complete"]
    rest = sparsekern_cl.run({**cfg, "resume": True})
    assert rest["acc_matrix"] == full["acc_matrix"] and rest["train_flops"] == full["train_flops"]


def test_layer_choice_on_resnet():
    base = {
        **TINY,
        "backbone": "resnet18",
        "nf": 2,
        "synthetic": {"n_classes": 6, "n_train": 4, "n_test": 2, "shape": [3, 8, 8], "noise": 30.0},
    }
    _, model, _, _ = build_run(resolve_config({**base, "method": "sparcl_derpp", "sparcl_layers": "block_convs"}))
    names = [n for n, _ in sparsekern.sparse_modules(model)]
    assert len(names) == 16 and all(n.startswith("layer") and "shortcut" not in n for n in names)
    _, model, _, _ = build_run(resolve_config({**base, "method": "sparcl_derpp", "sparcl_layers": "all_convs"}))
    names = [n for n, _ in sparsekern.sparse_modules(model)]
    assert "conv1" in names and any("shortcut" in n for n in names) and "head" not in names


@pytest.mark.parametrize(
    "key, value",
    [
        ("sparcl_shrink", 1.5),
        ("sparcl_layers", "heads"),
        ("sparcl_ddr_count", "loss"),
        ("sparcl_delta", 0),
        ("sparcl_dgm", "yes"),
    ],
)
def test_bad_settings_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        sparsekern_cl.run({**TINY, "method": "sparcl_derpp", key: value})


def test_mlp_layer_choice_that_selects_nothing_is_an_error():
    with pytest.raises(ValueError, match="sparcl_layers"):
        sparsekern_cl.run({**TINY, "method": "sparcl_er", "sparcl_layers": "block_convs"})


# --------------------------------------------------------------------------- the official code's rules
# TINY's explicit shrink/expand would override the preset's
OFFICIAL = {"preset": "sparcl-official", "sparcl_layers": "mlp_hidden", "mlp_hidden": [100],
            "sparcl_shrink": 0.01, "sparcl_expand": 0.01}  # fmt: skip


def _steps(strategy, scenario, task, n=2):
    data = scenario.train[task]
    for b in range(n):
        sl = slice(b * 8, (b + 1) * 8)
        strategy.observe(strategy.transform(data.x[sl]), data.x[sl], data.y[sl], task, data.uid[sl])


def test_official_preset_masks_other_tasks_logits_in_the_current_batch_loss():
    import torch.nn.functional as F

    for method in ("sparcl_derpp", "sparcl_er"):
        cfg, scenario, model, strategy = _setup(method=method, **OFFICIAL)
        assert cfg["mask_current_logits"] and not strategy.multihead
        data = scenario.train[1]
        x, y = strategy.transform(data.x[:8]), data.y[:8]
        ctx = StepContext(x=x, x_raw=data.x[:8], y=y, task=1, uid=data.uid[:8], step=0)
        strategy.prepare(ctx)  # empty buffer: the loss is the current batch's alone
        lo, hi = scenario.task_classes(1)
        with torch.no_grad():
            expected = F.cross_entropy(model(x)[:, lo:hi], y - lo)
            torch.testing.assert_close(strategy.loss(ctx), expected)
        # the paper preset keeps every logit
        cfg, scenario, model, strategy = _setup(method=method, preset="sparcl-paper", sparcl_layers="mlp_hidden")
        assert not cfg["mask_current_logits"]
        with torch.no_grad():
            torch.testing.assert_close(strategy.loss(ctx), F.cross_entropy(model(x), y))


def test_current_logit_masking_leaves_replayed_examples_whole():
    import torch.nn.functional as F

    cfg, scenario, model, strategy = _setup(method="sparcl_er", **OFFICIAL)
    strategy.begin_task(0)
    _steps(strategy, scenario, 0)  # fills the buffer
    data = scenario.train[1]
    x, y = strategy.transform(data.x[:8]), data.y[:8]
    ctx = StepContext(x=x, x_raw=data.x[:8], y=y, task=1, uid=data.uid[:8], step=0)
    strategy.prepare(ctx)
    xb, yb, _, _ = ctx.extra["replay"]
    lo, hi = scenario.task_classes(1)
    with torch.no_grad():
        out = model(torch.cat([x, xb]))
        cur = out[:8].clone()
        cur[:, :lo] = -1e9
        cur[:, hi:] = -1e9
        expected = F.cross_entropy(torch.cat([cur, out[8:]]), torch.cat([y, yb]))
        torch.testing.assert_close(strategy.loss(ctx), expected)


def test_official_warmup_adds_one_point_of_density_and_ends_past_the_target():
    cfg, scenario, model, strategy = _setup(sparcl_ddr=False, sparcl_dgm=False, sparcl_freeze_last=0, **OFFICIAL)
    tdm = _plugin(strategy, TaskAwareDynamicMasking)
    layer = model.fc1
    n, target = layer.weight.numel(), int(layer.weight_mask.sum())
    assert target == round(0.25 * n)
    strategy.begin_task(0)  # the official schedule expands at every task start, the first included
    assert int(layer.weight_mask.sum()) == target + round(0.01 * n) and tdm.in_warmup
    _steps(strategy, scenario, 0)
    before = layer.weight_mask.clone()
    tdm.end_epoch(strategy, 0, 0)  # warm-up end: prune to s + 1 point by CWI, regrow 1 point at random
    after = layer.weight_mask
    assert int(after.sum()) == target and not tdm.in_warmup
    assert int((before & ~after).sum()) == 2 * round(0.01 * n) and int((after & ~before).sum()) == round(0.01 * n)
    tdm.end_epoch(strategy, 0, 1)  # intra-task: prune to s + 1 point, regrow to s
    assert tdm.history[-1]["kind"] == "shrink_expand" and tdm.history[-1]["regrown"] == round(0.01 * n)


def test_no_mask_update_from_the_freeze_epoch_on(monkeypatch):
    cfg, scenario, model, strategy = _setup(
        sparcl_ddr=False, sparcl_dgm=False, epochs=50, sparcl_delta=5, sparcl_warmup=5, sparcl_freeze_last=5, **OFFICIAL
    )
    tdm = _plugin(strategy, TaskAwareDynamicMasking)
    done = []
    monkeypatch.setattr(tdm, "shrink_expand", lambda s, t, e: done.append(("update", e + 1)))
    monkeypatch.setattr(tdm, "shrink_to_target", lambda s, t, e, regrow=False: done.append(("warmup_end", e + 1)))
    tdm.in_warmup = True
    for e in range(50):
        tdm.end_epoch(strategy, 0, e)
        if done and done[-1][0] == "warmup_end":
            tdm.in_warmup = False
    # the warm-up ends after epoch 5, updates follow every 5 epochs up to the start of epoch 40;
    # from epoch 45 (the last 5 of 50) the mask is frozen
    assert done == [("warmup_end", 5)] + [("update", d) for d in range(10, 45, 5)]


def test_official_dgm_keeps_the_top_fifth_of_each_tensor():
    from sparsekern_cl.methods.sparcl import top_tensor_gradient_mask

    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[:, :5] = True  # 50 % active
    score = torch.rand(10, 10)
    g = top_tensor_gradient_mask(mask, score, 0.2)
    assert int(g.sum()) == 20 and not bool((g & ~mask).any())
    assert float(score[g].min()) >= float(score[mask & ~g].max())
    sparse = torch.zeros(10, 10, dtype=torch.bool)
    sparse[:, 0] = True  # 10 % active: all of it is kept
    assert torch.equal(top_tensor_gradient_mask(sparse, score, 0.2), sparse)
    # in a run: after a refresh the gradient mask holds 20 % of fc1's entries at s = 0.75
    cfg, scenario, model, strategy = _setup(sparcl_ddr=False, sparcl_tdm=False, **OFFICIAL)
    strategy.begin_task(0)
    _steps(strategy, scenario, 0, n=1)
    assert int(model.fc1.grad_mask.sum()) == round(0.2 * model.fc1.weight.numel())


def test_official_cwi_uses_the_last_minibatch_gradient_without_an_extra_pass():
    cfg, scenario, model, strategy = _setup(sparcl_ddr=False, sparcl_dgm=False, **OFFICIAL)
    tdm = _plugin(strategy, TaskAwareDynamicMasking)
    counter = strategy.flop_counter
    strategy.begin_task(0)
    counter.active = True
    _steps(strategy, scenario, 0)
    grad = model.fc1.weight.grad.clone()
    flops = counter.total
    scores = tdm.importance(strategy, 0)
    assert counter.total == flops  # no recomputation
    torch.testing.assert_close(scores[0], model.fc1.weight.detach().abs() + 0.5 * grad.abs())


def test_paper_preset_cwi_uses_all_of_the_task_and_the_buffer():
    cfg = resolve_config({"method": "sparcl_derpp", "preset": "sparcl-paper"})
    assert cfg["sparcl_importance_samples"] == 0 and cfg["alpha"] == 0.2 and not cfg["sparse_rescale"]
    cfg, scenario, model, strategy = _setup(
        preset="sparcl-paper", sparcl_layers="mlp_hidden", sparcl_importance_samples=0
    )
    tdm = _plugin(strategy, TaskAwareDynamicMasking)
    strategy.begin_task(0)
    _steps(strategy, scenario, 0)
    assert tdm.importance(strategy, 0)[0].shape == model.fc1.weight.shape  # whole task and buffer, in chunks
    assert tdm._sample(1000).tolist() == list(range(1000))
