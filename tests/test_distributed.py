"""sparsekern.distributed and DDP with sparse layers: two gloo processes on this machine.

One spawn runs every library case (each process start costs seconds on two cores); the tests
read what the ranks recorded.  The data-parallel ``python -m sparsekern_cl`` runs are in
tests/cl/test_cl_distributed.py.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_x(rank: int, rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(100 + rank))


def _masked_grads(layer, x, M, G):
    """Reference ``(y, dW, db)`` of a sparse linear layer on one rank, in dense PyTorch."""
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    y = x @ (w * M).T + b
    y.square().sum().backward()
    return y.detach(), w.grad * G, b.grad


def _avg(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def _case_buffer_sync(rank: int, track: bool) -> dict:
    """Rank 1 switches to its own mask after DDP is built (weights kept); DDP's forward sync copies
    rank 0's masks back into it."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import sparsekern.distributed as skd
    from sparsekern import SparseLinear

    torch.manual_seed(0)
    layer = SparseLinear(48, 24, sparsity=0.6, backend="cpp")
    ddp = DDP(layer)
    handle = skd.track_buffer_sync(ddp) if track else None
    M0, G0 = layer.weight_mask.clone(), layer.grad_mask.clone()
    x = _rank_x(rank, 8, 48)
    if rank == 1:
        other = torch.rand(24, 48, generator=torch.Generator().manual_seed(9)) > 0.4
        layer.set_mask(other, zero_pruned=False)
        layer(x)  # metadata built for rank 1's own mask
    before = layer.weight_mask._version
    y = ddp(x)
    after = layer.weight_mask._version
    y.square().sum().backward()
    y_ref, dw_ref, db_ref = _masked_grads(layer, x, M0, G0)
    out = {
        "mask_is_rank0s": torch.equal(layer.weight_mask, M0) and torch.equal(layer.grad_mask, G0),
        "version_kept_by_sync": before == after,
        "y_err": float((y.detach() - y_ref).abs().max()),
        "dw_err": float((layer.weight.grad - _avg(dw_ref)).abs().max()),
        "db_err": float((layer.bias.grad - _avg(db_ref)).abs().max()),
        "dw_outside_g": float(layer.weight.grad[~G0].abs().max()),
    }
    if handle is not None:
        out["rebuilds"] = handle.tracker.rebuilds
        handle.remove()
    return out


def _case_comm_hook(rank: int) -> dict:
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    import sparsekern.distributed as skd
    from sparsekern import SparseConv2d, SparseLinear

    def model():
        torch.manual_seed(1)
        net = nn.Sequential(
            SparseConv2d(3, 8, 3, padding=1, sparsity=0.75, backend="cpp"),
            nn.ReLU(),
            nn.Flatten(),
            SparseLinear(8 * 6 * 6, 16, sparsity=0.9, backend="cpp"),
            nn.ReLU(),
            nn.Linear(16, 5),
        )
        net[3].set_grad_mask(
            net[3].weight_mask & (torch.rand(16, 288, generator=torch.Generator().manual_seed(2)) > 0.3)
        )
        return net

    dense, sparse = DDP(model()), DDP(model())
    state = skd.register_sparse_grad_hook(sparse)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(200 + rank))
    for net in (dense, sparse):
        for _ in range(2):  # the second step runs on DDP's rebuilt buckets
            net.zero_grad()
            net(x).square().mean().backward()
    errs, outside = [], []
    for pd, ps in zip(dense.module.parameters(), sparse.module.parameters()):
        errs.append(float((pd.grad - ps.grad).abs().max() / pd.grad.abs().max().clamp_min(1e-12)))
    for i in (0, 3):
        layer = sparse.module[i]
        outside.append(float(layer.weight.grad[~layer.grad_mask].abs().max()))
    params = list(sparse.module.parameters())
    total = sum(p.numel() for p in params)
    g_sizes = int(sparse.module[0].grad_mask.sum()) + int(sparse.module[3].grad_mask.sum())
    sent = total - sparse.module[0].weight.numel() - sparse.module[3].weight.numel() + g_sizes

    # a model of one bias-free sparse weight: the ratio is exactly 1/(1-s) of its gradient mask
    torch.manual_seed(3)
    only = DDP(SparseLinear(64, 32, bias=False, sparsity=0.9, backend="cpp"))
    st = skd.register_sparse_grad_hook(only)
    only(_rank_x(rank, 4, 64)).sum().backward()
    s = 1.0 - only.module.grad_density()
    return {
        "rel_err": max(errs),
        "outside_g": max(outside),
        "ratio": state.traffic_ratio,
        "ratio_expected": total / sent,
        "one_layer_ratio": st.traffic_ratio,
        "one_layer_expected": 1.0 / (1.0 - s),
    }


def _case_broadcast_masks(rank: int) -> dict:
    import sparsekern.distributed as skd
    from sparsekern import SparseLinear
    from sparsekern.formats import pattern_of

    torch.manual_seed(4)
    layer = SparseLinear(40, 20, sparsity=0.5, backend="cpp")
    if rank == 1:
        layer.set_mask(torch.rand(20, 40, generator=torch.Generator().manual_seed(5)) > 0.5, zero_pruned=False)
    x = _rank_x(0, 6, 40)
    layer(x)  # caches built for each rank's own mask
    changed = skd.broadcast_masks(layer)
    gathered = [torch.zeros_like(layer.weight_mask) for _ in range(WORLD)]
    dist.all_gather(gathered, layer.weight_mask)
    csr = pattern_of(layer.weight_mask).csr()
    y = layer(x)
    y_ref = x @ (layer.weight.detach() * layer.weight_mask).T + layer.bias.detach()
    return {
        "changed": changed,
        "masks_equal": torch.equal(gathered[0], gathered[1]),
        "meta_describes_mask": torch.equal(csr.to_mask(), layer.weight_mask),
        "y_err": float((y.detach() - y_ref).abs().max()),
    }


def _case_allreduce_grads(rank: int) -> dict:
    from torch import nn

    import sparsekern.distributed as skd
    from sparsekern import SparseLinear

    torch.manual_seed(6)
    net = nn.Sequential(SparseLinear(32, 16, sparsity=0.8, backend="cpp"), nn.Linear(16, 4))
    net(_rank_x(rank, 5, 32)).square().sum().backward()
    want = [_avg(p.grad) for p in net.parameters()]
    sent = skd.allreduce_grads(net)
    err = max(float((p.grad - w).abs().max()) for p, w in zip(net.parameters(), want))
    return {
        "err": err,
        "sent": sent,
        "dense": sum(p.numel() for p in net.parameters()),
        "expected_sent": int(net[0].grad_mask.sum()) + 16 + 16 * 4 + 4,
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # the content checksum of SPARSEKERN_CHECK_MASKS would hide DDP's write behind the counter:
    # these ranks run as users do, on version counters alone
    os.environ["SPARSEKERN_CHECK_MASKS"] = "0"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        res = {
            "stale": _case_buffer_sync(rank, track=False),
            "tracked": _case_buffer_sync(rank, track=True),
            "hook": _case_comm_hook(rank),
            "broadcast": _case_broadcast_masks(rank),
            "allreduce": _case_allreduce_grads(rank),
        }
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank leaves while another still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_ddp_forward_sync_hides_its_mask_write(ranks):
    # what DDP does: its per-forward buffer sync writes rank 0's mask into rank 1 and restores
    # the version counter, so without the tracker rank 1 keeps its old pattern's metadata
    r1 = ranks[1]["stale"]
    assert r1["mask_is_rank0s"] and r1["version_kept_by_sync"]
    assert r1["y_err"] > 1e-2 and r1["dw_outside_g"] > 0, r1  # stale forward, dW outside G


def test_track_buffer_sync_matches_rank0(ranks):
    for rank, res in enumerate(ranks):
        r = res["tracked"]
        assert r["mask_is_rank0s"], (rank, r)
        assert r["y_err"] < 1e-5 and r["dw_err"] < 1e-5 and r["db_err"] < 1e-5, (rank, r)
        assert r["dw_outside_g"] == 0.0, (rank, r)
    assert ranks[0]["tracked"]["rebuilds"] == 0  # rank 0's buffers are the ones sent
    assert ranks[1]["tracked"]["rebuilds"] == 1


def test_sparse_comm_hook_matches_dense_allreduce(ranks):
    for res in ranks:
        h = res["hook"]
        assert h["rel_err"] < 1e-5, h
        assert h["outside_g"] == 0.0
        assert h["ratio"] == pytest.approx(h["ratio_expected"])
        assert h["one_layer_ratio"] == pytest.approx(h["one_layer_expected"])
        assert h["one_layer_ratio"] > 9.0  # sparsity 0.9: about 10x less traffic


def test_broadcast_masks(ranks):
    assert [r["broadcast"]["changed"] for r in ranks] == [0, 1]
    for res in ranks:
        b = res["broadcast"]
        assert b["masks_equal"] and b["meta_describes_mask"] and b["y_err"] < 1e-5, b


def test_allreduce_grads_sends_values_on_g(ranks):
    for res in ranks:
        a = res["allreduce"]
        assert a["err"] < 1e-6
        assert a["sent"] == a["expected_sent"] < a["dense"]
