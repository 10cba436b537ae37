"""K-FAC estimated on 2 CPU processes (gloo) must equal 1 process on the same data.

``run(OUT_DIR)`` (in an initialised group: ``group_jobs.py``) writes ``OUT_DIR/dist_{mode}_rank{r}.pt`` (state
dicts).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


#: what every process (and the single-process reference of ``test_kfac.py``) passes to ``estimate_fisher``
KWARGS = dict(kind="kfac", fisher_type="empirical", batch_size=3, show_progress=False)


def build_model():
    from hf_continual.toy import tiny_bert

    return tiny_bert(0, hidden_size=16, num_attention_heads=2, intermediate_size=24, num_labels=3).eval()


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
        f = estimate_fisher(model, build_dataset(), kfac_mode=mode, **KWARGS)
        torch.save(f.state_dict(), out / f"dist_{mode}_rank{rank}.pt")
