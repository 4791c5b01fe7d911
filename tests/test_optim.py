"""sparsekern.optim: sparse-aware SGD / Adam / AdamW against torch.optim, state remap, state_dict.

The fused C++ path runs where ``sparsekern._C`` is built (with ``CI=true`` or
``SPARSEKERN_STRICT=1`` a missing build fails the ``cpp`` cases instead of skipping them);
the pure-PyTorch path is forced with ``SPARSEKERN_BACKEND=reference``.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import sparsekern as sk
import sparsekern.optim as so
from tests.support import STRICT as REQUIRE  # SPARSEKERN_STRICT=1 / CI=true

OK, WHY = so.kernels_available()

# (class name, kwargs): the configurations checked bit-for-bit against torch.optim
CONFIGS = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("SGD", {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "maximize": True}),
    ("Adam", {"lr": 1e-2}),
    ("Adam", {"lr": 1e-2, "betas": (0.3, 0.9), "amsgrad": True}),
    ("Adam", {"lr": 1e-2, "maximize": True, "eps": 1e-6}),
    ("AdamW", {"lr": 1e-2, "weight_decay": 0.0}),
]
CONFIG_IDS = [f"{n}-" + "-".join(f"{k}{v}" for k, v in kw.items()) for n, kw in CONFIGS]


@pytest.fixture(params=["cpp", "reference"])
def path(request, monkeypatch):
    """Which update runs: the fused C++ op or the PyTorch fallback; checks that it did."""
    if request.param == "cpp" and not OK:
        if REQUIRE:
            pytest.fail(f"sparsekern._C is required here (SPARSEKERN_STRICT / CI) but not usable: {WHY}")
        pytest.skip(f"C++ kernels not built: {WHY}")
    if request.param == "reference":
        monkeypatch.setenv("SPARSEKERN_BACKEND", "reference")
    seen = []
    real = so._use_kernel
    monkeypatch.setattr(so, "_use_kernel", lambda p, g: seen.append(real(p, g)) or seen[-1])
    yield request.param
    if seen:
        assert set(seen) == {request.param == "cpp"}


def mixed_model(dtype=torch.float32, sparsity=0.7) -> nn.Module:
    """SparseConv2d, BatchNorm, SparseLinear and a dense nn.Linear head; one layer with G ⊂ M."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 24),
        nn.ReLU(),
        nn.Linear(24, 5),
    )
    sk.sparsify_(model, sparsity, filter_fn=lambda m, fqn: fqn != "8")
    model = model.to(dtype)
    g = model[6].grad_mask.clone()
    g[:, ::3] = False  # frozen connections
    model[6].set_grad_mask(g)
    return model


def batch(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 8, 8, generator=gen, dtype=dtype), torch.randint(0, 5, (6,), generator=gen)


def train(model, opt, steps, seed=0):
    for s in range(steps):
        x, y = batch(next(model.parameters()).dtype, seed + s)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def pair(name, kw, dtype=torch.float32):
    """The same model twice: one with the stock optimizer, one with the sparse one."""
    a, b = mixed_model(dtype), mixed_model(dtype)
    return a, getattr(torch.optim, name)(a.parameters(), **kw), b, getattr(so, name)(b.parameters(), model=b, **kw)


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{n}: max diff {(p - q).abs().max().item()}"


# ---------------------------------------------------------------------------- same as torch.optim
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,kw", CONFIGS, ids=CONFIG_IDS)
def test_bit_identical_to_torch_optim(name, kw, dtype, path):
    a, oa, b, ob = pair(name, kw, dtype)
    frozen = b[6].weight_mask & ~b[6].grad_mask
    w0 = b[6].weight.detach().clone()
    train(a, oa, 4)
    train(b, ob, 4)
    assert_same(a, b)
    assert torch.equal(b[6].weight[frozen], w0[frozen])  # frozen entries never move


def test_state_is_compact_on_g():
    model = mixed_model()
    opt = so.Adam(model.parameters(), lr=1e-3, amsgrad=True, model=model)
    train(model, opt, 1)
    for _, layer in sk.sparse_modules(model):
        st = opt.state[layer.weight]
        nnz = int(layer.grad_mask.sum())
        assert nnz < layer.weight.numel()
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert st[key].shape == (nnz,) and st[key].dtype == layer.weight.dtype
        assert st["index"].dtype == torch.int32
        assert torch.equal(st["index"].long(), layer.grad_mask.reshape(-1).nonzero().squeeze(1))
    head = model[8].weight  # dense: torch's own state
    assert opt.state[head]["exp_avg"].shape == head.shape


def test_index_cached_per_mask_version():
    model = mixed_model()
    opt = so.SGD(model.parameters(), lr=0.1, momentum=0.9, model=model)
    train(model, opt, 1)
    w = model[6].weight
    idx = opt.state[w]["index"]
    train(model, opt, 1)
    assert opt.state[w]["index"] is idx  # no rebuild while the mask is unchanged
    model[6].set_grad_mask(model[6].grad_mask.clone())  # same set, new version: rebuilt, no remap
    buf = opt.state[w]["momentum_buffer"]
    train(model, opt, 1)
    assert opt.state[w]["index"] is not idx and torch.equal(opt.state[w]["index"], idx)
    assert opt.state[w]["momentum_buffer"] is buf


def test_deepcopy_keeps_the_sparse_layers():
    a, _, b, ob = pair("SGD", {"lr": 0.1, "momentum": 0.9})
    train(b, ob, 1)
    b2, ob2 = copy.deepcopy((b, ob))
    oa = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    train(a, oa, 3)
    train(b2, ob2, 2, seed=1)
    assert_same(a, b2)
    assert ob2.state[b2[6].weight]["momentum_buffer"].numel() == int(b2[6].grad_mask.sum())


def test_threads_do_not_change_results(path):
    layer = sk.SparseLinear(256, 256, sparsity=0.4)  # ~39k entries: several tasks
    outs, threads0 = [], torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        model = copy.deepcopy(layer)
        for name, kw in (("SGD", {"lr": 0.1, "momentum": 0.9}), ("Adam", {"lr": 1e-2})):
            opt = getattr(so, name)(model.parameters(), model=model, **kw)
            for s in range(2):
                opt.zero_grad()
                model(torch.randn(8, 256, generator=torch.Generator().manual_seed(s))).square().sum().backward()
                opt.step()
        outs.append(model.weight.detach().clone())
    torch.set_num_threads(threads0)
    assert torch.equal(outs[0], outs[1])


def test_channels_last_weight_takes_the_fallback():
    a, oa, b, ob = pair("SGD", {"lr": 0.1, "momentum": 0.9})
    a.to(memory_format=torch.channels_last)
    b.to(memory_format=torch.channels_last)
    assert not b[0].weight.is_contiguous()
    train(a, oa, 3)
    train(b, ob, 3)
    assert_same(a, b)


def test_param_groups_and_empty_grad_mask(path):
    torch.manual_seed(0)
    model = nn.Sequential(sk.SparseLinear(12, 10, sparsity=0.5), nn.ReLU(), sk.SparseLinear(10, 4, sparsity=0.5))
    model[2].set_grad_mask(torch.zeros_like(model[2].grad_mask))
    ref = copy.deepcopy(model)

    def groups(m):
        return [{"params": [m[0].weight], "lr": 0.3}, {"params": [m[0].bias, m[2].weight, m[2].bias]}]

    opt = so.SGD(groups(model), lr=0.1, momentum=0.5, model=model)
    oref = torch.optim.SGD(groups(ref), lr=0.1, momentum=0.5)
    for m, o in ((model, opt), (ref, oref)):
        for _ in range(3):
            o.zero_grad()
            m(torch.randn(5, 12, generator=torch.Generator().manual_seed(1))).sum().backward()
            o.step()
    assert_same(ref, model)
    assert opt.state[model[2].weight]["momentum_buffer"].numel() == 0


# ---------------------------------------------------------------------------- weight decay
@pytest.mark.parametrize(
    "name,kw",
    [
        ("SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}),
        ("Adam", {"lr": 1e-2, "weight_decay": 0.1}),
        ("AdamW", {"lr": 1e-2, "weight_decay": 0.1}),
    ],
    ids=["SGD", "Adam-L2", "AdamW"],
)
def test_weight_decay_leaves_entries_outside_g_alone(name, kw, path):
    a, oa, b, ob = pair(name, kw)
    layer = b[6]
    g, frozen = layer.grad_mask.clone(), layer.weight_mask & ~layer.grad_mask
    w0 = layer.weight.detach().clone()
    train(a, oa, 1)
    train(b, ob, 1)
    # first step: same gradients, so the entries of G agree bit for bit ...
    assert torch.equal(a[6].weight[g], layer.weight[g])
    assert torch.equal(a[8].weight, b[8].weight)  # the dense head decays as in torch
    # ... while torch.optim decays the frozen weights and the sparse optimizer does not
    assert torch.equal(layer.weight[frozen], w0[frozen])
    assert not torch.equal(a[6].weight[frozen], w0[frozen])
    train(a, oa, 2, seed=1)
    train(b, ob, 2, seed=1)
    assert torch.equal(layer.weight[frozen], w0[frozen])
    assert torch.all(layer.weight[~layer.weight_mask] == 0)  # pruned weights stay zero


# ---------------------------------------------------------------------------- mask changes
def _grow(layer: nn.Module, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    new = (torch.rand(layer.weight.shape, generator=gen) < 0.2) & ~layer.weight_mask
    layer.set_mask(layer.weight_mask | new)  # new connections: trainable, start at zero
    return new


@pytest.mark.parametrize("name,kw", CONFIGS[1:3] + CONFIGS[4:6], ids=CONFIG_IDS[1:3] + CONFIG_IDS[4:6])
def test_regrowth_matches_torch_optim(name, kw, path):
    """Growing G mid-training: new entries start with zero state, which is the stock optimizer's
    state there too (their gradient was zero), so the runs stay bit-identical."""
    a, oa, b, ob = pair(name, kw)
    train(a, oa, 2)
    train(b, ob, 2)
    for m in (a, b):
        _grow(m[3], 1)
        _grow(m[6], 2)
    train(a, oa, 3, seed=5)
    train(b, ob, 3, seed=5)
    assert_same(a, b)
    for layer in (b[3], b[6]):
        key = "momentum_buffer" if name == "SGD" else "exp_avg"
        assert ob.state[layer.weight][key].numel() == int(layer.grad_mask.sum())


@pytest.mark.parametrize(
    "name,kw,keys",
    [
        ("SGD", {"lr": 0.1, "momentum": 0.9}, ("momentum_buffer",)),
        ("Adam", {"lr": 1e-2, "amsgrad": True}, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
    ],
    ids=["SGD", "Adam"],
)
def test_state_remap_keeps_survivors_and_zeroes_newcomers(name, kw, keys, path):
    model = mixed_model()
    opt = getattr(so, name)(model.parameters(), model=model, **kw)
    train(model, opt, 2)
    layer = model[3]
    w = layer.weight
    old_g = layer.grad_mask.clone()
    dense_state = {}
    for k in keys:
        full = torch.zeros(w.numel(), dtype=w.dtype)
        full[opt.state[w]["index"].long()] = opt.state[w][k]
        dense_state[k] = full
    gen = torch.Generator().manual_seed(3)
    drop = old_g & (torch.rand(w.shape, generator=gen) < 0.3)
    grow = ~layer.weight_mask & (torch.rand(w.shape, generator=gen) < 0.3)
    layer.set_mask((layer.weight_mask & ~drop) | grow)
    new_g = layer.grad_mask
    opt.zero_grad()
    w.grad = torch.zeros_like(w)  # a step with zero gradient shows the remapped state
    before = w.detach().clone()
    if name == "SGD":
        opt.step()
        buf = opt.state[w]["momentum_buffer"]
        expect = dense_state["momentum_buffer"] * 0.9  # buf.mul_(momentum) + 0
        assert torch.equal(buf, expect.reshape(-1)[new_g.reshape(-1)])
        assert torch.all(buf[grow.reshape(-1)[new_g.reshape(-1)]] == 0)
    else:
        opt.step()
        zero = torch.zeros_like(dense_state["exp_avg"])
        v = dense_state["exp_avg_sq"].mul(0.999).addcmul_(zero, zero, value=1 - 0.999)
        expect = {
            "exp_avg": dense_state["exp_avg"].lerp(zero, 1 - 0.9),
            "exp_avg_sq": v,
            "max_exp_avg_sq": torch.maximum(dense_state["max_exp_avg_sq"], v),
        }
        for k in keys:
            assert torch.equal(opt.state[w][k], expect[k][new_g.reshape(-1)])
        assert torch.all(opt.state[w]["exp_avg_sq"][grow.reshape(-1)[new_g.reshape(-1)]] == 0)
    assert torch.equal(w[~new_g], before[~new_g])  # dropped entries no longer move
    assert opt.state[w]["index"].numel() == int(new_g.sum())


# ---------------------------------------------------------------------------- state_dict
def _save(*objs) -> io.BytesIO:
    f = io.BytesIO()
    torch.save([o.state_dict() for o in objs], f)
    f.seek(0)
    return f


@pytest.mark.parametrize("name,kw", [CONFIGS[2], CONFIGS[5], ("AdamW", {"lr": 1e-2})], ids=["SGD", "Adam", "AdamW"])
def test_state_dict_resume_is_bit_identical(name, kw, path):
    model = mixed_model()
    opt = getattr(so, name)(model.parameters(), model=model, **kw)
    train(model, opt, 2)
    _grow(model[6], 4)  # a mask change before the checkpoint
    train(model, opt, 1, seed=2)
    f = _save(model, opt)
    train(model, opt, 3, seed=7)

    fresh = mixed_model()
    fopt = getattr(so, name)(fresh.parameters(), model=fresh, **kw)
    msd, osd = torch.load(f)
    fresh.load_state_dict(msd)
    fopt.load_state_dict(osd)
    st = fopt.state[fresh[6].weight]
    assert st["index"].dtype == torch.int32  # not cast to the parameter's dtype
    train(fresh, fopt, 3, seed=7)
    assert_same(model, fresh)


def test_loaded_state_is_remapped_onto_the_models_g():
    model = mixed_model()
    opt = so.SGD(model.parameters(), lr=0.1, momentum=0.9, model=model)
    train(model, opt, 2)
    f = _save(opt)
    other = mixed_model()
    _grow(other[6], 9)
    oopt = so.SGD(other.parameters(), lr=0.1, momentum=0.9, model=other)
    oopt.load_state_dict(torch.load(f)[0])
    train(other, oopt, 1)
    assert oopt.state[other[6].weight]["momentum_buffer"].numel() == int(other[6].grad_mask.sum())


@pytest.mark.parametrize("name,kw", [CONFIGS[1], CONFIGS[4]], ids=["SGD", "Adam"])
def test_torch_optim_state_dict_loads_and_continues_identically(name, kw):
    a, oa, b, ob = pair(name, kw)
    train(a, oa, 2)
    b.load_state_dict(a.state_dict())
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # dense state: compacted at the next step
    train(a, oa, 2, seed=3)
    train(b, ob, 2, seed=3)
    assert_same(a, b)
    key = "momentum_buffer" if name == "SGD" else "exp_avg"
    assert ob.state[b[6].weight][key].numel() == int(b[6].grad_mask.sum())


# ---------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda m: so.SGD(m.parameters(), lr=-0.1, model=m), ValueError, "lr"),
        (lambda m: so.SGD(m.parameters(), lr="0.1", model=m), TypeError, "lr"),
        (lambda m: so.SGD(m.parameters(), lr=0.1, momentum=-1, model=m), ValueError, "momentum"),
        (lambda m: so.SGD(m.parameters(), lr=0.1, weight_decay=-1e-4, model=m), ValueError, "weight_decay"),
        (lambda m: so.SGD(m.parameters(), lr=0.1, nesterov=True, model=m), ValueError, "nesterov"),
        (lambda m: so.SGD(m.parameters(), lr=0.1, model=m.state_dict()), TypeError, "model"),
        (lambda m: so.SGD(m.parameters(), lr=0.1), TypeError, "model"),
        (lambda m: so.Adam(m.parameters(), lr=-1.0, model=m), ValueError, "lr"),
        (lambda m: so.Adam(m.parameters(), eps=-1e-8, model=m), ValueError, "eps"),
        (lambda m: so.Adam(m.parameters(), betas=(1.0, 0.999), model=m), ValueError, r"betas\[0\]"),
        (lambda m: so.Adam(m.parameters(), betas=(0.9, -0.1), model=m), ValueError, r"betas\[1\]"),
        (lambda m: so.Adam(m.parameters(), betas=0.9, model=m), ValueError, "betas"),
        (lambda m: so.AdamW(m.parameters(), weight_decay=float("nan"), model=m), ValueError, "weight_decay"),
    ],
    ids=[
        "lr<0",
        "lr-str",
        "momentum",
        "wd",
        "nesterov",
        "model-dict",
        "no-model",
        "adam-lr",
        "eps",
        "beta0",
        "beta1",
        "betas-float",
        "adamw-wd-nan",
    ],
)
def test_bad_arguments_name_the_argument(make, exc, match):
    with pytest.raises(exc, match=match):
        make(mixed_model())


# ---------------------------------------------------------------------------- the C++ ops
# need_cpp: the fixture in tests/conftest.py


def _op_args(dtype=torch.float32, n=40):
    w, g = torch.randn(5, 8, dtype=dtype), torch.randn(5, 8, dtype=dtype)
    idx = torch.tensor([0, 3, 4, 9, 17, 30, 39], dtype=torch.int32)
    return w, g, idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_opcheck(dtype, need_cpp):
    w, g, idx = _op_args(dtype)
    k = idx.numel()
    torch.library.opcheck(
        torch.ops.sparsekern.sgd_step_masked_.default,
        (w, g, idx, torch.randn(k, dtype=dtype), 0.1, 0.9, 0.0, 0.01, True, False, False),
    )
    torch.library.opcheck(
        torch.ops.sparsekern.adam_step_masked_.default,
        (
            w,
            g,
            idx.long(),
            torch.randn(k, dtype=dtype),
            torch.rand(k, dtype=dtype),
            torch.rand(k, dtype=dtype),
            1e-3,
            0.9,
            0.999,
            1e-8,
            0.01,
            3.0,
            True,
            False,
        ),
    )


def test_op_rejects_bad_inputs(need_cpp):
    w, g, idx = _op_args()
    buf = torch.zeros(idx.numel())
    sgd = torch.ops.sparsekern.sgd_step_masked_
    with pytest.raises(RuntimeError, match="idx: must be strictly increasing"):
        sgd(w, g, idx.flip(0), buf, 0.1, 0.9, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match="idx: must be strictly increasing"):
        sgd(w, g, torch.tensor([1, 40], dtype=torch.int32), buf[:2], 0.1, 0.9, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match="momentum_buffer: expected 7 entries"):
        sgd(w, g, idx, buf[:3], 0.1, 0.9, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match="momentum_buffer: required"):
        sgd(w, g, idx, None, 0.1, 0.9, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match="grad: expected dtype"):
        sgd(w, g.double(), idx, buf, 0.1, 0.9, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match="idx: expected dtype int32 or int64"):
        sgd(w, g, idx.float(), buf, 0.1, 0.9, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match="step: expected"):
        torch.ops.sparsekern.adam_step_masked_(
            w, g, idx, buf, buf.clone(), None, 1e-3, 0.9, 0.999, 1e-8, 0.0, 0.0, False, False
        )


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_fused_step_bumps_the_weight_version(name):
    """A step writes the weight in place: autograd must see it like a torch.optim step."""
    layer = sk.SparseLinear(32, 16, sparsity=0.8)
    opt = getattr(sk.optim, name)(layer.parameters(), lr=0.1, model=layer)
    layer(torch.randn(4, 32)).sum().backward()
    v = layer.weight._version
    opt.step()
    assert layer.weight._version > v
    y = layer(torch.randn(4, 32, requires_grad=True)).sum()
    opt.step()  # between a forward and its backward, as with torch.optim: the backward refuses
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
