"""K-FAC estimated on 2 CPU processes (gloo) must equal 1 process on the same data.

``run(OUT_DIR)`` (in an initialised group: ``group_jobs.py``) writes ``OUT_DIR/dist_{mode}_rank{r}.pt`` (state
dicts).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def build_model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg).eval()


def build_dataset(n: int = 11, pad_to: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        length = 2 + i % 5
        ids = torch.zeros(pad_to, dtype=torch.long)
        ids[:length] = torch.randint(1, 40, (length,), generator=g)
        am = (ids != 0).long()
        out.append({"input_ids": ids, "attention_mask": am, "labels": torch.tensor(i % 3)})
    return out


def run(out_dir: str) -> None:
    import torch.distributed as dist

    from hf_continual.curvature import estimate_fisher

    out = Path(out_dir)
    rank = dist.get_rank()
    model = build_model()
    for mode in ("expand", "reduce"):
        f = estimate_fisher(
            model,
            build_dataset(),
            kind="kfac",
            kfac_mode=mode,
            fisher_type="empirical",
            batch_size=3,
            show_progress=False,
        )
        torch.save(f.state_dict(), out / f"dist_{mode}_rank{rank}.pt")
