"""torchrun --nproc_per_node 2 stream_dist.py OUT METHOD ...: for each method, a 2-task toy stream on 2 CPU ranks
(same global batches as one process with batch 16) in ``OUT/<method>.d``; each rank saves R, the consolidated
curvature or mask, its parameters and the files it wrote under that directory (recorded by an audit hook: opens
for writing and renames) as ``OUT/<method>.rank<r>``. The methods share one launch: starting the processes
costs more than a stream."""

import os
import sys

import common  # noqa: F401  (destroys the process group at exit)
import torch

from hf_continual import ContinualConfig
from hf_continual.stream import run_stream
from hf_continual.toy import tiny_bert, toy_stream

GLOBAL_BATCH = 16


def record_writes(root: str) -> list[str]:
    """Paths under ``root`` this process opens for writing or renames to, from now on (``sys.addaudithook``)."""
    root = os.path.abspath(root)
    writes: list[str] = []

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2]
            writing = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            path = os.path.abspath(os.fsdecode(args[0]))
        elif event == "os.rename":
            writing, path = True, os.path.abspath(os.fsdecode(args[1]))
        else:
            return
        if writing and path.startswith(root):
            writes.append(os.path.relpath(path, root))

    sys.addaudithook(hook)
    return writes


def run(method: str, out_dir: str, writes: list[str] | None = None) -> dict:
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
    result = run_stream(model, toy_stream(n_train=32, n_eval=16)[:2], args, save_final_model=True)
    method_state = result.trainer.method
    record = {
        "R": result.accuracy_matrix,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "writes": list(writes or []),
    }
    if hasattr(method_state, "terms"):
        record["curvature"] = method_state.terms[0][1].state_dict()
    if hasattr(method_state, "masks"):
        record["masks"] = method_state.masks
    return record


if __name__ == "__main__":
    out, rank = sys.argv[1], int(os.environ.get("RANK", "0"))
    for method in sys.argv[2:]:
        stem = os.path.join(out, method)
        writes = record_writes(stem + ".d")
        record = run(method, stem + ".d", writes)
        torch.save(record, f"{stem}.rank{rank}")
