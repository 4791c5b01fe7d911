"""Run by tests/cl/test_cl_distributed.py under torchrun: sparse CL methods through
``sparsekern_cl.run``, each rank saving what it ended with, then a check that must catch a
rank that diverges.  Not a test module (no ``test_`` prefix)."""

import json
import os
import sys

import torch
import torch.distributed as dist

import sparsekern
import sparsekern_cl
from sparsekern_cl import parallel


def main(out: str, cfg: dict, methods: list[str]) -> None:
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")  # the runner uses a group that is already there
    try:
        for method in methods:
            res = sparsekern_cl.run({**cfg, "method": method, "output_dir": os.path.join(out, method)})
            rec = {
                "acc_matrix": res["acc_matrix"],
                "train_flops": res["train_flops"],
                "data_parallel": res["data_parallel"],
            }
            with open(os.path.join(out, f"{method}.rank{rank}.json"), "w") as f:
                json.dump(rec, f)
        # a rank whose weights differ must stop the run with the check's error
        par = parallel.DataParallel()
        net = sparsekern.SparseLinear(4, 3, sparsity=0.5)
        torch.manual_seed(0)
        torch.nn.init.normal_(net.weight)
        if rank == 1:
            with torch.no_grad():
                net.weight[0, 0] += 1.0
        try:
            par.check_consistent("the test", {"model": net.state_dict(), "rng": torch.tensor([1])})
            caught = None
        except RuntimeError as exc:
            caught = str(exc)
        with open(os.path.join(out, f"check.rank{rank}.json"), "w") as f:
            json.dump({"caught": caught}, f)
        dist.barrier()  # no rank leaves while another still talks to it
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3].split(","))
