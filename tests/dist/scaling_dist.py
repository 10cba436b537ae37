"""torchrun --nproc_per_node 2 scaling_dist.py OUT.pt [method] [prior]: one step on the global batch, 2 CPU ranks."""

import sys

import torch
import torch.distributed as dist
from common import GLOBAL_BATCH, one_step_params

if __name__ == "__main__":
    out, method = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "none")
    prior = len(sys.argv) > 3 and sys.argv[3] == "prior"
    params = one_step_params(
        out + ".d", per_device_batch=GLOBAL_BATCH // 2, grad_accum=1, method=method, prior_task=prior
    )
    if dist.get_rank() == 0:
        torch.save(params, out)
    else:
        torch.save(params, out + ".rank1")
