"""DST (continual learning with dynamic sparse training): masks, drop/grow, isolation, evaluation, runs."""

import copy
import math

import pytest
import torch

import sparsekern
import sparsekern_cl
from sparsekern_cl.methods.dst import (
    GROWTH,
    DSTPlugin,
    choose_growth,
    cosine_drop_rate,
    magnitude_drop,
    task_densities,
    update_interval,
)
from sparsekern_cl.runner import build_run, evaluate

TINY = {
    "method": "dst",
    "dataset": "synthetic",
    "synthetic": {"n_classes": 6, "n_train": 16, "n_test": 6, "shape": [1, 6, 6], "noise": 30.0},
    "n_tasks": 3,
    "backbone": "mlp",
    "mlp_hidden": [24, 24],
    "epochs": 2,
    "batch_size": 8,
    "lr": 0.3,
    "sparsity": 0.5,
    "dst_update_every": 2,
    "progress": False,
    "plots": False,
}


def _setup(**kw):
    cfg = sparsekern_cl.resolve_config({**TINY, **kw})
    scenario, model, strategy, counter = build_run(cfg)
    plugin = next(p for p in strategy.plugins if isinstance(p, DSTPlugin))
    return cfg, scenario, model, strategy, counter, plugin


# ----------------------------------------------------------------------------- initialisation
@pytest.mark.parametrize("sparsity", [0.8, 0.9, 0.95])
def test_erk_densities_match_formula_and_target(sparsity):
    shapes = [(100, 784), (100, 100), (64, 32, 3, 3)]
    d = task_densities(shapes, sparsity, "erk")
    n = [math.prod(s) for s in shapes]
    assert sum(di * ni for di, ni in zip(d, n)) / sum(n) == pytest.approx(1 - sparsity, rel=1e-9)
    # density / (sum(shape)/prod(shape)) is the same constant for every layer below the cap
    ratios = [di / (sum(s) / math.prod(s)) for di, s in zip(d, shapes) if di < 1.0]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)
    assert task_densities(shapes, sparsity, "uniform") == pytest.approx([1 - sparsity] * 3)
    with pytest.raises(ValueError, match="sparse_distribution"):
        task_densities(shapes, sparsity, "normal")


@pytest.mark.parametrize("dist", ["erk", "uniform"])
def test_task_masks_have_the_layer_densities(dist):
    _, _, model, strategy, _, plugin = _setup(sparse_distribution=dist, sparsity=0.8)
    strategy.begin_task(0)
    layers = dict(sparsekern.sparse_modules(model))
    assert set(layers) == {"fc1", "fc2"}  # the head stays dense (its rows are the task heads)
    kept = total = 0
    for name, layer in layers.items():
        want = round(plugin.densities[name] * layer.weight.numel())
        assert int(layer.weight_mask.sum()) == want
        assert torch.equal(layer.grad_mask, layer.weight_mask)  # task 0 owns all of its mask
        assert bool((layer.weight[~layer.weight_mask] == 0).all())
        kept += want
        total += layer.weight.numel()
    assert kept / total == pytest.approx(0.2, abs=2 / total)
    if dist == "erk":  # the narrower layer gets the higher density
        assert plugin.densities["fc2"] > plugin.densities["fc1"]


def test_cosine_drop_rate_anneals():
    assert cosine_drop_rate(0, 100, 0.5, 0.005) == pytest.approx(0.5)
    assert cosine_drop_rate(50, 100, 0.5, 0.005) == pytest.approx(0.2525)
    assert cosine_drop_rate(100, 100, 0.5, 0.005) == pytest.approx(0.005)


# ----------------------------------------------------------------------------- drop / grow
@pytest.mark.parametrize("growth", ["random", "unfired", "gradient", "momentum"])
def test_drop_grow_keeps_counts_exact(growth):
    _, _, model, strategy, _, plugin = _setup()
    layer = dict(sparsekern.sparse_modules(model))["fc1"]
    strategy.begin_task(0)
    # pretend an earlier task froze a third of the layer's inactive positions
    frozen = ~layer.weight_mask & (torch.rand(layer.weight.shape) < 0.3)
    plugin.used["fc1"] = frozen.clone()
    with torch.no_grad():
        layer.weight[frozen] = 7.0
    before_w = layer.weight.detach().clone()
    m0, g0 = layer.weight_mask.clone(), layer.grad_mask.clone()
    scores = torch.rand(layer.weight.shape)
    k = plugin.drop_and_grow(layer, "fc1", 0.3, growth, scores, torch.Generator().manual_seed(1), strategy)
    assert k == round(0.3 * int(g0.sum()))
    assert int(layer.weight_mask.sum()) == int(m0.sum()) and int(layer.grad_mask.sum()) == int(g0.sum())
    dropped, grown = m0 & ~layer.weight_mask, layer.weight_mask & ~m0
    assert int(dropped.sum()) == int(grown.sum()) == k
    # the dropped ones were the k smallest |w| of the task's own weights
    kept_own = g0 & ~dropped
    assert before_w[dropped].abs().max() <= before_w[kept_own].abs().min()
    # grown weights are new, free, trainable and start at zero; frozen weights are untouched
    assert not bool((grown & frozen).any()) and bool(layer.grad_mask[grown].all())
    assert bool((layer.weight[grown] == 0).all())
    assert torch.equal(layer.weight[frozen], before_w[frozen])
    if growth in ("gradient", "momentum"):  # the k best-scoring free positions
        free = ~m0 & ~frozen
        assert scores[grown].min() >= scores[free & ~grown].max()


def test_unfired_never_picks_a_fired_weight():
    _, _, model, strategy, _, plugin = _setup()
    layer = dict(sparsekern.sparse_modules(model))["fc2"]
    strategy.begin_task(0)
    gen = torch.Generator().manual_seed(0)
    fired_before = plugin.fired["fc2"] | (torch.rand(layer.weight.shape, generator=gen) < 0.6)
    plugin.fired["fc2"] = fired_before.clone()
    unfired = int((~fired_before).sum())
    own = int(layer.grad_mask.sum())
    k = plugin.drop_and_grow(layer, "fc2", 1.0, "unfired", None, gen, strategy)
    grown = layer.weight_mask & ~fired_before
    assert k == min(own, unfired) and int(grown.sum()) == k
    assert bool(plugin.fired["fc2"][grown].all())  # grown weights count as fired from now on
    # only unfired positions remain candidates, so fewer move once they run out (never a fired one)
    fired2, mask2 = plugin.fired["fc2"].clone(), layer.weight_mask.clone()
    k2 = plugin.drop_and_grow(layer, "fc2", 1.0, "unfired", None, gen, strategy)
    grown2 = layer.weight_mask & ~mask2
    assert k2 == min(own, unfired - k) == int(grown2.sum())
    assert not bool((grown2 & fired2).any())


def test_ranked_choices_break_ties_randomly_and_respect_candidates():
    cand = torch.zeros(50, dtype=torch.bool)
    cand[10:40] = True
    picks = [choose_growth(cand, 5, torch.zeros(50), torch.Generator().manual_seed(s)) for s in range(4)]
    assert all(int(p.sum()) == 5 and not bool((p & ~cand).any()) for p in picks)
    assert len({tuple(torch.nonzero(p).flatten().tolist()) for p in picks}) > 1  # not always the first ones
    w = torch.arange(50, dtype=torch.float32) - 25
    d = magnitude_drop(w, cand, 3, torch.Generator().manual_seed(0))
    assert sorted(torch.nonzero(d).flatten().tolist()) == [24, 25, 26]  # |w| = 1, 0, 1


# ----------------------------------------------------------------------------- isolation and evaluation
class _Spy(sparsekern_cl.Plugin):
    """Records every sparse layer's weights and the task's head at each task end."""

    def __init__(self):
        self.weights, self.heads, self.params = [], [], []

    def end_task(self, s, t):
        self.weights.append({n: m.weight.detach().clone() for n, m in sparsekern.sparse_modules(s.model)})
        self.heads.append({k: v.detach().clone() for k, v in s.model.head.state_dict().items()})
        self.params.append({k: v.detach().clone() for k, v in s.model.named_parameters()})


@pytest.fixture(scope="module", params=["shared", "private"])
def spied_run(request):
    spy = _Spy()
    plugins = {}

    def make(cfg, model, scenario):
        plugins["dst"] = DSTPlugin(cfg, model, scenario)
        return [plugins["dst"], spy]

    sparsekern_cl.register_method("dst_spy", "finetune", make)
    try:
        res = sparsekern_cl.run(
            {**TINY, "method": "dst_spy", "dst_growth": "gradient", "dst_task_params": request.param}
        )
    finally:
        sparsekern_cl.STRATEGIES.pop("dst_spy")
    return res, spy, plugins["dst"]


def test_frozen_weights_stay_bit_identical(spied_run):
    res, spy, plugin = spied_run
    for t, masks in enumerate(plugin.masks):
        for later in range(t + 1, len(spy.weights)):
            for name, m in masks.items():
                assert torch.equal(spy.weights[later][name][m], spy.weights[t][name][m]), (t, later, name)
    # later tasks did reuse earlier weights in their forward (random overlap), and added their own
    assert any(h["reused_weights"]["fc1"] > 0 for h in plugin.history[1:])
    assert all(h["own_weights"]["fc1"] > 0 for h in plugin.history)
    # hence Task-IL accuracy of a finished task never changes
    R = res["acc_matrix"]["task_il"]
    assert all(R[i][j] == R[j][j] for j in range(3) for i in range(j, 3))
    assert res["bwt"]["task_il"] == 0.0


def test_task_il_evaluation_uses_the_tasks_mask_and_head(spied_run):
    res, spy, plugin = spied_run
    model = plugin.model
    layers = dict(sparsekern.sparse_modules(model))
    current = {n: m.weight_mask.clone() for n, m in layers.items()}
    head_now = {k: v.clone() for k, v in model.head.state_dict().items()}
    assert not torch.equal(plugin.masks[0]["fc1"], current["fc1"])
    with plugin.eval_task(None, 0):
        for n, m in layers.items():
            assert torch.equal(m.weight_mask, plugin.masks[0][n])
        for k, v in model.head.state_dict().items():
            if plugin.private:
                assert torch.equal(v, spy.heads[0][k])
            else:  # shared head: task 0's rows frozen since task 0 ended
                assert torch.equal(v[:2], spy.heads[0][k][:2])
        x = torch.randn(4, 1, 6, 6)
        as_task0 = model(x)
    # the same function built by hand from task 0's stored masks, weights and parameters
    h = x.flatten(1)
    st = plugin.task_states[0] if plugin.private else spy.params[0]
    for n in ("fc1", "fc2"):
        h = torch.relu(h @ (spy.weights[0][n] * plugin.masks[0][n]).t() + st[f"{n}.bias"])
    torch.testing.assert_close(as_task0[:, :2], (h @ st["head.weight"].t() + st["head.bias"])[:, :2])
    # restored afterwards
    for n, m in layers.items():
        assert torch.equal(m.weight_mask, current[n])
    for k, v in model.head.state_dict().items():
        assert torch.equal(v, head_now[k])
    assert plugin.eval_task(None, 7) is None  # an untrained task runs on the current network


def test_shared_parameters_freeze_after_the_first_task(spied_run):
    res, spy, plugin = spied_run
    if plugin.private:  # a copy of everything outside the sparse weights per task, counted in the capacity
        assert len(plugin.task_states) == 3 and not plugin.shared.where
        per_task = sum(v.numel() for v in plugin.task_states[0].values())
        total = sum(w.numel() for w in spy.weights[-1].values()) + 24 * 6
        assert res["model_capacity"] >= 1 - res["model_sparsity"] + 0.25 * 3 / 32 + 2 * per_task / total
        return
    assert plugin.task_states == []  # nothing stored per task but the masks
    first = spy.params[0]
    for later in spy.params[1:]:
        for k in ("fc1.bias", "fc2.bias"):
            assert torch.equal(later[k], first[k])  # frozen since the first task
    for t in range(3):  # each task's head rows never move once the task is done
        lo, hi = 2 * t, 2 * (t + 1)
        for later in spy.params[t:]:
            assert torch.equal(later["head.weight"][lo:hi], spy.params[t]["head.weight"][lo:hi])
    assert not torch.equal(spy.params[1]["head.weight"][2:4], first["head.weight"][2:4])  # later rows learn
    # capacity: the stored masks plus every earlier weight outside the current mask
    total = sum(w.numel() for w in spy.weights[-1].values()) + 24 * 6
    outside = sum(int((plugin.used[n] & ~plugin.masks[-1][n]).sum()) for n in plugin.masks[-1])
    assert res["model_capacity"] == pytest.approx(1 - res["model_sparsity"] + 0.25 * 3 / 32 + outside / total)


def test_batchnorm_statistics_freeze_after_the_first_task():
    cfg = {**TINY, "backbone": "resnet18", "nf": 2, "synthetic": {**TINY["synthetic"], "shape": [3, 8, 8]}}
    _, scenario, model, strategy, _, plugin = _setup(**{k: v for k, v in cfg.items() if k != "method"})
    bn = model.bn1
    data = scenario.train[0]
    for t in range(2):
        strategy.begin_task(t)
        stats = bn.running_mean.clone()
        model.train()
        data = scenario.train[t]
        strategy.observe(strategy.transform(data.x[:8]), data.x[:8], data.y[:8], t, data.uid[:8])
        assert torch.equal(bn.running_mean, stats) == (t == 1)  # moves during task 0 only
        strategy.end_task(t)


def _exact_norm_statistics(model, x):
    """Per BatchNorm layer (mean, unbiased var) of its input over ``x``, from a train-mode forward of a copy."""
    model = copy.deepcopy(model)
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, inp, name=n: seen.__setitem__(name, inp[0].detach()))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    model.train()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return {n: (v.mean((0, 2, 3)), v.transpose(0, 1).reshape(v.shape[1], -1).var(1)) for n, v in seen.items()}


@pytest.mark.parametrize("task_params", ["shared", "private"])
def test_frozen_batchnorm_statistics_are_the_exact_ones_of_the_task(task_params):
    # a short task leaves the running averages near their initial values (0.9^steps of them at
    # momentum 0.1); frozen (shared) or stored (private) like that, evaluation saw a broken network
    cfg = {**TINY, "backbone": "resnet18", "nf": 2, "synthetic": {**TINY["synthetic"], "shape": [3, 8, 8]}}
    _, scenario, model, strategy, _, plugin = _setup(**cfg, dst_task_params=task_params)
    stats = {}
    for t in range(2):
        strategy.begin_task(t)
        model.train()
        data = scenario.train[t]
        for s in range(0, len(data), 8):
            b = slice(s, s + 8)
            strategy.observe(strategy.transform(data.x[b]), data.x[b], data.y[b], t, data.uid[b])
        strategy.end_task(t)
        x = scenario.preprocess(scenario.train[t].x, train=False)
        want = _exact_norm_statistics(model, x)
        if t == 1 and task_params == "shared":  # frozen at the end of task 0: unchanged by task 1
            assert all(torch.equal(model.get_submodule(n).running_mean, stats[n][0]) for n in stats)
            continue
        stats = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in model.named_modules() if n in want}
        assert len(stats) > 5
        for n, (mean, var) in want.items():
            torch.testing.assert_close(stats[n][0], mean, rtol=1e-4, atol=1e-5, msg=n)
            torch.testing.assert_close(stats[n][1], var, rtol=1e-4, atol=1e-5, msg=n)
        if task_params == "private":
            stored = plugin.task_states[t]
            assert all(torch.equal(stored[f"{n}.running_var"], stats[n][1]) for n in stats)


def test_default_update_interval_fits_short_tasks():
    # the code's 100 steps never fired in a task of 25 steps (ResNet-18, MNIST subset, 1 epoch)
    assert [update_interval(None, n) for n in (1, 8, 25, 50, 999, 1000, 5000)] == [1, 1, 3, 5, 100, 100, 100]
    assert update_interval(7, 25) == 7
    res = sparsekern_cl.run({**TINY, "dst_update_every": None})
    tasks = res["method_report"]["dst"]["tasks"]
    assert [(h["steps"], h["update_every"], h["updates"]) for h in tasks] == [(8, 1, 7)] * 3  # none at the last step
    assert sparsekern_cl.resolve_config({**TINY, "dst_update_every": None})["dst_update_every"] is None
    assert sparsekern_cl.DEFAULTS["dst_update_every"] is None


def test_evaluate_switches_per_task():
    seen = []

    class Probe:
        def __init__(self, t):
            self.t = t

        def __enter__(self):
            seen.append(("in", self.t))

        def __exit__(self, *a):
            seen.append(("out", self.t))

    _, scenario, model, strategy, _, _ = _setup()
    evaluate(model, scenario, 0, "cpu", 4, task_context=Probe)
    assert seen == [(s, t) for t in range(3) for s in ("in", "out")]


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("growth", GROWTH)
def test_end_to_end_each_growth(growth):
    res = sparsekern_cl.run({**TINY, "dst_growth": growth})
    assert res["complete"]
    R = res["acc_matrix"]["task_il"]
    assert all(R[t][t] >= 75.0 for t in range(3)), R
    assert res["bwt"]["task_il"] == 0.0
    rep = res["method_report"]["dst"]
    assert [h["updates"] for h in rep["tasks"]] == [3, 3, 3]  # 4 steps x 2 epochs, every 2, none after the last
    usage = [h["usage"] for h in rep["tasks"]]
    assert usage == sorted(usage) and 0.5 <= usage[0] < usage[-1] <= 1.0
    assert set(rep["usage_per_layer"]) == {"fc1", "fc2"}
    assert res["model_capacity"] >= 1 - res["model_sparsity"] + 0.25 * 3 / 32  # + earlier weights outside the mask
    extra = res["flops_breakdown"]["counted"].get("dense_grad", 0.0)
    chosen = {g for h in rep["tasks"] for g in h["growth"].values()}
    assert (extra > 0) == bool(chosen & {"gradient", "momentum"})
    assert res["train_flops"] < res["dense_train_flops"]
    if growth == "adaptive_naive":
        assert [h["growth"]["fc1"] for h in rep["tasks"]] == ["random", "gradient", "gradient"]
    if growth == "adaptive_capacity":  # random while >= 70 % of a layer is free, then gradient
        for h in rep["tasks"]:
            for n, g in h["growth"].items():
                assert g == ("random" if h["free_fraction_per_layer"][n] >= 0.7 else "gradient")
        assert "gradient" in chosen


def test_dense_reference_is_a_multihead_finetune():
    res = sparsekern_cl.run({**TINY, "sparsity": 0.0, "epochs": 1})
    assert res["method_report"]["dst"] == {"sparse_layers": []}
    ft = sparsekern_cl.run({**TINY, "method": "finetune", "head": "multi", "sparsity": 0.0, "epochs": 1})
    assert res["acc_matrix"] == ft["acc_matrix"] and res["train_flops"] == ft["train_flops"]


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("dst_growth", "rigl", "dst_growth: expected one of"),
        ("dst_update_every", 0, "dst_update_every: expected an integer"),
        ("dst_drop_rate", 1.5, "dst_drop_rate: expected a number in"),
        ("weight_decay", 1e-4, "weight_decay: expected 0 for method 'dst'"),
    ],
)
def test_bad_settings_are_named(key, value, match):
    with pytest.raises(ValueError, match=match):
        sparsekern_cl.run({**TINY, key: value})


def test_dst_trains_with_compact_gradients_bit_identically():
    """DST reads no sparse weight's ``weight.grad`` (growth uses captured activations), so it runs
    with the compact gradient layout, with the same results as the dense layout."""
    cfg, scenario, model, strategy, counter, plugin = _setup()
    assert strategy.grad_layout() == "compact"
    on = sparsekern_cl.run(dict(TINY))
    off = sparsekern_cl.run({**TINY, "compact_grads": False})
    assert on["acc_matrix"] == off["acc_matrix"]
    assert on["train_flops"] == off["train_flops"] and on["model_sparsity"] == off["model_sparsity"]
