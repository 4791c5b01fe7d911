"""Shared steps of the op suites: running a public op on the backend under test (a refusal becomes
a skip or a failure by the support matrix, tests.support.Target.refused) and comparing its
forward and gradients with dense masked PyTorch in float64."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern.testing import assert_matches, conv_inputs, linear_inputs
from tests.support import HALF


def leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    """A fresh leaf with the same values and strides (non-contiguous stays non-contiguous)."""
    return None if t is None else t.detach().clone().requires_grad_(True)


def call(target, op: str, dtype, fn, weight_shape=None, groups: int = 1):
    """``fn()``; a BackendError is a documented refusal (skip) or a missing feature (failure)."""
    try:
        return fn()
    except sk.BackendError as exc:
        target.refused(exc, op, dtype, weight_shape, groups)


def forward_backward(fn, tensors, dy=None, seed: int = 1):
    """``fn(*leaves)`` and its gradients for ``dy`` (default: a seeded normal of the output's shape)."""
    leaves = [leaf(t) for t in tensors]
    y = fn(*leaves)
    if dy is None:
        gen = torch.Generator().manual_seed(seed)
        dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y)
    y.backward(dy)
    return (y.detach(), *(None if t is None else t.grad for t in leaves)), dy


def oracle(dense_fn, tensors, mask, grad_mask, dy, weight_index: int = 1):
    """Forward and gradients of ``dense_fn`` on the masked weight (``tensors[weight_index]``, NaN
    outside ``mask`` is dropped), with the weight gradient restricted to ``grad_mask`` (``mask``
    when None)."""
    tensors = list(tensors)
    tensors[weight_index] = tensors[weight_index].masked_fill(~mask, 0)
    out, _ = forward_backward(dense_fn, tensors, dy)
    out = list(out)
    g = mask if grad_mask is None else grad_mask
    out[1 + weight_index] = out[1 + weight_index].masked_fill(~g, 0)
    return out


def check_against_dense(got, dense_fn, tensors, mask, grad_mask, dy, names, weight_index: int = 1):
    """Every output of ``got`` against ``dense_fn`` in float64 (and, for fp16 / bf16, PyTorch's own
    result in that dtype: the error may be at most twice its own), and the weight gradient
    exactly zero outside the gradient mask."""
    up = [None if t is None else t.double() for t in tensors]
    exact = oracle(dense_fn, up, mask, grad_mask, dy.double(), weight_index)
    own = oracle(dense_fn, tensors, mask, grad_mask, dy, weight_index) if got[0].dtype in HALF else [None] * len(got)
    for name, g, e, o in zip(names, got, exact, own):
        if e is None:
            assert g is None, f"{name}: expected no gradient"
            continue
        assert_matches(g, e, o, what=name)
    dw = got[1 + weight_index]
    g = mask if grad_mask is None else grad_mask
    assert bool((dw[~g] == 0).all()), "the weight gradient must be exactly zero outside the gradient mask"


def gradcheck(target, fn, inputs) -> None:
    """float64 ``gradcheck`` (fast mode in the Triton interpreter, where each launch is slow)."""
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=target.interpreted)


OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.1, momentum=0.5),
}


def check_frozen_weights_never_move(module, make_input, backend, run, opt_name):
    """Weights outside the gradient mask (frozen and pruned) stay bit-identical under a stock
    optimizer; the others learn."""
    torch.manual_seed(3)
    module = module.to(backend.device)
    frozen = module.weight_mask & (torch.rand(module.weight.shape) < 0.5).to(backend.device)
    module.set_grad_mask(module.weight_mask & ~frozen)
    before = module.weight.detach().clone()
    opt = OPTIMIZERS[opt_name](list(module.parameters()))

    def steps():
        for _ in range(5):
            loss = module(make_input()).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()

    run(steps, torch.float32)
    w = module.weight.detach()
    outside_g = ~module.grad_mask
    assert torch.equal(w[outside_g], before[outside_g])  # frozen and pruned: bit-identical
    assert torch.equal(w[frozen], before[frozen])
    assert not torch.equal(w[module.grad_mask], before[module.grad_mask])  # the rest learned


# ------------------------------------------------------------------------------------------------
# one case of the conformance suites: both passes (with a bias and the case's first gradient mask,
# without a bias and its second), on NaN-poisoned pruned weights
# ------------------------------------------------------------------------------------------------

NAMES = ("y", "dx", "dw", "db")


def _exact_bias_rows(y, bias, empty):
    """Output features (rows of ``y``'s dim 1) with no weight are exactly the bias (or zero)."""
    got = y[:, empty]
    expect = torch.zeros_like(got) if bias is None else bias[empty].view(-1, *([1] * (got.dim() - 2))).expand_as(got)
    assert torch.equal(got, expect), "outputs without weights must be exactly the bias"


def check_linear_case(target, case, dtype) -> None:
    inp = linear_inputs(case, dtype, target.device)
    m, k = case.out_features, case.in_features
    for bias, grad_mask in zip((inp.bias, None), inp.grad_masks):

        def op(x, w, b, grad_mask=grad_mask):
            return sk.sparse_linear(
                x, w, b, inp.mask, grad_mask, backend=target.name, layout=case.layout, block_size=case.block
            )

        tensors = (inp.x, inp.weight, bias)
        got, dy = call(target, "linear", dtype, lambda op=op, tensors=tensors: forward_backward(op, tensors))
        assert got[0].shape == (*case.batch, m) and got[1].shape == inp.x.shape
        check_against_dense(got, F.linear, tensors, inp.mask, grad_mask, dy, NAMES)
        _exact_bias_rows(got[0].reshape(-1, m), bias, ~inp.mask.any(1))
        dx = got[1].reshape(-1, k)
        assert bool((dx[:, ~inp.mask.any(0)] == 0).all()), "inputs without weights must have a zero gradient"


def check_conv_case(target, case, dtype) -> None:
    inp = conv_inputs(case, dtype, target.device)
    conv = case.conv
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    batched = inp.x.dim() == 4
    for bias, grad_mask in zip((inp.bias, None), inp.grad_masks):

        def op(x, w, b, grad_mask=grad_mask):
            return sk.sparse_conv2d(
                x, w, b, inp.mask, grad_mask, *args, backend=target.name, layout=case.layout, block_size=case.block
            )

        def dense(x, w, b=None):
            return F.conv2d(x, w, b, *args)

        tensors = (inp.x, inp.weight, bias)
        got, dy = call(
            target,
            "conv2d",
            dtype,
            lambda op=op, tensors=tensors: forward_backward(op, tensors),
            case.weight_shape,
            case.groups,
        )
        assert got[1].shape == inp.x.shape
        check_against_dense(got, dense, tensors, inp.mask, grad_mask, dy, NAMES)
        if case.x_layout == "channels_last" and target.impl.channels_last:
            assert got[0].is_contiguous(memory_format=torch.channels_last), "channels-last in, channels-last out"
        y, dx = (got[0], got[1]) if batched else (got[0].unsqueeze(0), got[1].unsqueeze(0))
        _exact_bias_rows(y, bias, ~inp.mask.flatten(1).any(1))
        if case.groups == 1:
            empty_in = ~inp.mask.transpose(0, 1).flatten(1).any(1)
            assert bool((dx[:, empty_in] == 0).all()), "input channels without weights must have a zero gradient"
