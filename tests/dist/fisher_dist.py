"""The diagonal Fisher on 2 CPU processes (gloo): ``run(OUT_DIR)``, in an initialised group (``group_jobs.py``).

Each rank estimates the diagonal Fisher of the same tiny BERT on its shard of 8 examples (the full dataset is
passed; the estimator shards it by rank) through a DDP-wrapped model, and saves the result as
``OUT_DIR/rank{r}.pt``. The pytest side compares with a single-process estimate.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hf_continual.toy import tiny_bert

KWARGS = dict(fisher_type="empirical", batch_size=3, show_progress=False)


def build() -> tuple[torch.nn.Module, list[dict]]:
    """Same model and data in every process."""
    model = tiny_bert(0, vocab_size=99, hidden_size=16, num_attention_heads=2, intermediate_size=37)
    g = torch.Generator().manual_seed(7)
    data = []
    for _ in range(8):
        data.append(
            {
                "input_ids": torch.randint(1, 99, (10,), generator=g),
                "attention_mask": torch.ones(10, dtype=torch.long),
                "labels": int(torch.randint(0, 2, (1,), generator=g)),
            }
        )
    return model, data


def run(out_dir: str) -> None:
    import torch.distributed as dist

    from hf_continual.curvature import estimate_fisher

    rank = dist.get_rank()
    model, data = build()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    emp = estimate_fisher(ddp, data, **KWARGS)
    true = estimate_fisher(ddp, data, fisher_type="true", batch_size=3, show_progress=False, seed=0)
    torch.save({"empirical": emp.state_dict(), "true": true.state_dict()}, Path(out_dir) / f"rank{rank}.pt")
