"""Data-parallel Hessian products: run alone or under torchrun (gloo, CPU); rank 0 writes the results.

python hessian_dp_worker.py OUT.json            # one process
torchrun --nproc_per_node=2 hessian_dp_worker.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from flatlora.testing import tiny_batches, tiny_model
from flatlora_analysis import ProbeSet, hessian_operator
from flatlora_analysis.hessian.suite import curvature


def main(out: str) -> None:
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = tiny_model("bert", r=2, target_modules=["query", "value"], dtype=torch.float64)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    probe = ProbeSet.from_batches(tiny_batches("bert", 2, 5))  # batches of 5 rows: 3 + 2 per rank
    result = curvature(
        model, probe, k=2, tol=1e-6, trace_samples=12, density_steps=8, density_runs=2, layers=True,
        data_parallel=True,
    )  # fmt: skip
    v = torch.randn(sum(p.numel() for n, p in model.named_parameters() if "lora_" in n), generator=g)
    with hessian_operator(model, probe, "lora") as op:
        if dist.is_initialized():
            op.objective.probe = probe.shard(dist.get_rank(), dist.get_world_size())
            op.reduce = dist.all_reduce
        hv = op.matvec(v.double())
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"curvature": result.to_dict(), "hv": hv.tolist()}, f)
    if dist.is_initialized():
        dist.barrier()  # ranks leave together (a rank torn down mid-collective aborts the other)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
