"""torchrun --nproc_per_node 2 fish_dist.py OUT.pt: FISH mask built on 2 CPU ranks (each estimates on its shard)."""

import sys

import torch
import torch.distributed as dist
from common import GLOBAL_BATCH, one_step_params

from hf_continual.masking import mask_hash

if __name__ == "__main__":
    out = sys.argv[1]
    _, trainer = one_step_params(
        out + ".d",
        GLOBAL_BATCH // 2,
        1,
        method="fish",
        return_trainer=True,
        fish_keep_ratio=0.05,
        fish_num_samples=8,
    )
    record = {"hash": mask_hash(trainer.method.masks), "masks": trainer.method.masks}
    torch.save(record, out if dist.get_rank() == 0 else out + ".rank1")
