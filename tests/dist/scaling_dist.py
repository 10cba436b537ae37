"""torchrun --nproc_per_node 2 scaling_dist.py OUT METHOD[:prior] ...: for each spec, one step on the global batch
on 2 CPU ranks (with ``:prior``, from a point away from a consolidated prior task), saved as
``OUT/<spec>.rank<r>.pt``. Several specs share one launch: starting the processes costs more than the steps."""

import os
import sys

import torch
import torch.distributed as dist
from common import GLOBAL_BATCH, one_step_params

if __name__ == "__main__":
    out = sys.argv[1]
    for spec in sys.argv[2:]:
        method, _, prior = spec.partition(":")
        params = one_step_params(
            os.path.join(out, spec + ".d"),
            per_device_batch=GLOBAL_BATCH // 2,
            grad_accum=1,
            method=method,
            prior_task=prior == "prior",
        )
        torch.save(params, os.path.join(out, f"{spec}.rank{dist.get_rank()}.pt"))
