"""torchrun --nproc_per_node 2 scaling_dist.py OUT SPEC ...: for each SPEC (``METHOD[:prior][:mask]``), one step on the
global batch on 2 CPU ranks, saved as ``OUT/<SPEC>.rank<r>.pt``: the parameters after the step, or with ``:mask``
the FISH mask the step's method built (``FISH_MASK_OPTIONS``) and its hash. With ``:prior`` the step starts from
a point away from a consolidated prior task. Several specs share one launch: starting the processes costs more
than the steps."""

import os
import sys

import torch
import torch.distributed as dist
from common import FISH_MASK_OPTIONS, GLOBAL_BATCH, one_step_params

from hf_continual.masking import mask_hash

if __name__ == "__main__":
    out = sys.argv[1]
    for spec in sys.argv[2:]:
        method, *flags = spec.split(":")
        params, trainer = one_step_params(
            os.path.join(out, spec + ".d"),
            per_device_batch=GLOBAL_BATCH // 2,
            grad_accum=1,
            method=method,
            prior_task="prior" in flags,
            return_trainer=True,
            **(FISH_MASK_OPTIONS if "mask" in flags else {}),
        )
        if "mask" in flags:
            record = {"hash": mask_hash(trainer.method.masks), "masks": trainer.method.masks}
        else:
            record = params
        torch.save(record, os.path.join(out, f"{spec}.rank{dist.get_rank()}.pt"))
