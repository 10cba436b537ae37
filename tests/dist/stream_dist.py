"""torchrun --nproc_per_node 2 stream_dist.py METHOD OUT: a 2-task toy stream on 2 CPU ranks (same global batches
as one process with batch 16); each rank saves R, the consolidated curvature or mask, and its parameters."""

import os
import sys

import torch

from hf_continual import ContinualConfig
from hf_continual.stream import run_stream
from hf_continual.toy import tiny_bert, toy_stream

GLOBAL_BATCH = 16


def run(method: str, out_dir: str) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = ContinualConfig(
        output_dir=out_dir,
        continual_method=method,
        use_cpu=True,
        report_to="none",
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        num_train_epochs=2,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        seed=0,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
        continual_lambda=100.0,
        fisher_batch_size=8,
        fisher_num_samples=32,
        fish_num_samples=32,
        fish_keep_ratio=0.05,
    )
    model = tiny_bert(0)
    result = run_stream(model, toy_stream(n_train=32, n_eval=16)[:2], args)
    method_state = result.trainer.method
    record = {
        "R": result.accuracy_matrix,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }
    if hasattr(method_state, "terms"):
        record["curvature"] = method_state.terms[0][1].state_dict()
    if hasattr(method_state, "masks"):
        record["masks"] = method_state.masks
    return record


if __name__ == "__main__":
    method, out = sys.argv[1], sys.argv[2]
    rank = int(os.environ.get("RANK", "0"))
    record = run(method, out + ".d")
    torch.save(record, f"{out}.rank{rank}")
