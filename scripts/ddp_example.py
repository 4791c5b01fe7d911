"""DDP with sparse layers on gloo: run with
``python -m torch.distributed.run --nproc_per_node 2 scripts/ddp_example.py``."""

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsekern
import sparsekern.distributed as skd

dist.init_process_group("gloo")  # "nccl" with one GPU per rank
rank = dist.get_rank()
torch.manual_seed(0)  # the same model on every rank (DDP also broadcasts rank 0's at wrap time)
model = nn.Sequential(sparsekern.SparseLinear(256, 256, sparsity=0.9), nn.ReLU(), nn.Linear(256, 10))
ddp = DDP(model)
skd.track_buffer_sync(ddp)  # DDP's per-forward buffer sync hides its mask writes: rebuild metadata
state = skd.register_sparse_grad_hook(ddp)  # all-reduce the first layer's gradient on G only
opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
g = torch.Generator().manual_seed(rank)  # each rank its own shard of data
for step in range(20):
    x, y = torch.randn(32, 256, generator=g), torch.randint(0, 10, (32,), generator=g)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(ddp(x), y)
    loss.backward()
    opt.step()
    if step == 9 and rank == 0:  # a mask decided on rank 0 ...
        model[0].set_mask(torch.rand(256, 256, generator=torch.Generator().manual_seed(1)) > 0.9)
    if step == 9:
        skd.broadcast_masks(model)  # ... reaches every rank (DDP's own sync would do it too)
if rank == 0:
    print(f"loss {loss.item():.3f}; elements sent / dense: 1/{state.traffic_ratio:.2f}")
    print(f"first layer: density {model[0].density():.3f}, 1/(1-s) = {1 / model[0].grad_density():.2f}")
dist.barrier()  # no rank leaves while another still talks to it
dist.destroy_process_group()
