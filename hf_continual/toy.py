"""A tiny synthetic 3-task stream on a random BERT: fast enough for unit tests and a CPU smoke run.

Each example is a random token sequence with a task-marker token in front. Task 0: label 1 iff token A occurs;
task 1: label 1 iff token A does NOT occur (the same feature, inverted); task 2: label 1 iff token B occurs.
Plain sequential fine-tuning overwrites the rule of task 0 when it learns task 1 (measurable forgetting), while
training on all tasks at once can fit every task because the marker tells them apart.
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification

from .stream import Task

VOCAB = 40
TOKEN_A, TOKEN_B = 7, 8
FIRST_FILLER = 10


def tiny_bert_config(**overrides) -> BertConfig:
    """A 2-layer BERT with hidden size 32: milliseconds per step on a CPU."""
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        type_vocab_size=2,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    values.update(overrides)
    return BertConfig(**values)


def tiny_bert(seed: int = 0, **overrides) -> BertForSequenceClassification:
    """A freshly initialised tiny BERT classifier (deterministic for a seed)."""
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(**overrides))


def tiny_dual_encoder(vocab_size: int, scale: float = 20.0, seed: int = 0, **overrides):
    """A freshly initialised tiny entity-linking dual encoder (1-2 layers of width 32; deterministic for a seed).

    ``vocab_size`` must cover the tokenizer the caller feeds it; ``overrides`` go to the encoder's ``BertConfig``.
    """
    from .tasks.entity_linking import DualEncoderConfig, DualEncoderModel

    # tiny_bert_config's width and depth; BERT's defaults for the rest (room for any tokenized name, dropout on)
    values = dict(
        vocab_size=vocab_size,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    values.update(overrides)
    torch.manual_seed(seed)
    return DualEncoderModel(DualEncoderConfig(encoder_config=tiny_bert_config(**values), scale=scale))


def _examples(task_id: int, n: int, seq_len: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed * 7919 + task_id)
    rows = []
    for i in range(n):
        length = int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=g))
        body = torch.randint(FIRST_FILLER, VOCAB, (length - 2,), generator=g)
        has_token = i % 2 == 0
        token = TOKEN_B if task_id == 2 else TOKEN_A
        if has_token:
            body[int(torch.randint(0, length - 2, (1,), generator=g))] = token
        label = int(has_token) if task_id != 1 else int(not has_token)
        ids = torch.cat([torch.tensor([1 + task_id]), body, torch.tensor([4])])  # marker ... [SEP]-like
        pad = seq_len - length
        rows.append(
            {
                "input_ids": torch.cat([ids, torch.zeros(pad, dtype=torch.long)]),
                "attention_mask": torch.cat(
                    [torch.ones(length, dtype=torch.long), torch.zeros(pad, dtype=torch.long)]
                ),
                "labels": torch.tensor(label),
            }
        )
    return rows


def accuracy_on(rows: list[dict[str, torch.Tensor]], batch_size: int = 64):
    """An ``evaluate(model)`` function: classification accuracy on ``rows``."""

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        correct = 0
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            ids = torch.stack([r["input_ids"] for r in batch]).to(device)
            mask = torch.stack([r["attention_mask"] for r in batch]).to(device)
            labels = torch.stack([r["labels"] for r in batch]).to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            correct += int((logits.argmax(-1) == labels).sum())
        return {"accuracy": correct / len(rows)}

    return evaluate


def toy_stream(n_train: int = 256, n_eval: int = 128, seq_len: int = 12, seed: int = 0) -> list[Task]:
    """Three toy tasks (see module docstring), each with its own train rows and held-out evaluation rows."""
    tasks = []
    for t, name in enumerate(["toy-a", "toy-not-a", "toy-b"]):
        train = _examples(t, n_train, seq_len, seed)
        held_out = _examples(t, n_eval, seq_len, seed + 10_000)
        tasks.append(
            Task(name=name, train_dataset=train, evaluate=accuracy_on(held_out), primary_metric="accuracy")
        )
    return tasks


def toy_config(output_dir: str, method: str = "none", **overrides):
    """A ContinualConfig that trains the toy stream in seconds on a CPU (8 epochs, batch 32, lr 2e-3)."""
    from .config import ContinualConfig

    values = dict(
        output_dir=output_dir,
        continual_method=method,
        use_cpu=True,
        report_to="none",
        num_train_epochs=8,
        per_device_train_batch_size=32,
        learning_rate=2e-3,
        seed=0,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    values.update(overrides)
    return ContinualConfig(**values)
