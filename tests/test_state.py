"""Continual state: round trip, corruption, mismatch, continuing from a saved directory (kill-and-resume of a
stream: tests/test_cli.py)."""

import os
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from hf_continual import ContinualTrainer
from hf_continual.state import STATE_META, STATE_TENSORS, ContinualStateError, load_state
from hf_continual.toy import tiny_bert, toy_config, toy_stream

DIST = Path(__file__).parent / "dist"


def _args(tmp_path, method, **kw):
    values = dict(
        num_train_epochs=2,
        per_device_train_batch_size=16,
        fisher_batch_size=16,
        fisher_num_samples=64,
        fish_keep_ratio=0.05,
        fish_num_samples=32,
        continual_lambda=100.0,
    )
    values.update(kw)
    return toy_config(str(tmp_path / "run"), method, **values)


def _train_task0(tmp_path, method, **kw):
    tasks = toy_stream(n_train=64, n_eval=16)
    trainer = ContinualTrainer(
        model=tiny_bert(0), args=_args(tmp_path, method, **kw), train_dataset=tasks[0].train_dataset
    )
    trainer.train()
    trainer.end_task(task_name="toy-a")
    return trainer, tasks


def _penalty_after_perturbation(trainer):
    torch.manual_seed(5)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    for p in trainer.model.parameters():
        p.grad = None
    value = float(trainer.method.apply_gradients(trainer.model))  # a detached tensor: read it here
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return value, grads


@pytest.mark.parametrize(
    "method, kw",
    [
        ("ewc", {}),
        ("online_ewc", {}),
        ("kfac", {}),
        ("kfac", {"kfac_rank": 4}),
        ("fish", {"fish_penalty": "ewc", "fish_protect": True}),
    ],
)
def test_round_trip_reproduces_penalty_and_mask(tmp_path, method, kw):
    trainer, _ = _train_task0(tmp_path, method, **kw)
    trainer.save_model(str(tmp_path / "saved"))
    model = BertForSequenceClassification.from_pretrained(tmp_path / "saved")
    fresh = ContinualTrainer(model=model, args=_args(tmp_path, method, **kw))
    fresh.load_continual_state(tmp_path / "saved")
    assert fresh.method.tasks_seen == ["toy-a"]
    if method == "fish":
        assert set(fresh.method.masks) == set(trainer.method.masks)
        for n, m in trainer.method.masks.items():
            assert torch.equal(fresh.method.masks[n], m)
    v1, g1 = _penalty_after_perturbation(trainer)
    v2, g2 = _penalty_after_perturbation(fresh)
    # The loaded tensors are bit-equal to the saved ones, but a tensor read back from a file may have another
    # memory layout, for which BLAS may choose another kernel (another summation order): fp32 rounding, a few
    # ulps per product, is what these tolerances allow. A lost or wrong factor changes the values by O(1).
    assert v1 > 0
    assert v2 == pytest.approx(v1, rel=1e-5)
    assert set(g1) == set(g2)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")


def test_truncated_or_corrupted_state_is_a_clear_error(tmp_path):
    trainer, _ = _train_task0(tmp_path, "ewc")
    saved = tmp_path / "saved"
    trainer.save_model(str(saved))
    data = (saved / STATE_TENSORS).read_bytes()
    (saved / STATE_TENSORS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ContinualStateError, match="truncated or corrupted"):
        load_state(saved)
    (saved / STATE_META).write_text("{not json")
    with pytest.raises(ContinualStateError, match="corrupted continual state record"):
        load_state(saved)
    os.remove(saved / STATE_META)
    with pytest.raises(ContinualStateError, match="no continual state"):
        load_state(saved)


def test_mismatched_model_names_the_parameters(tmp_path):
    trainer, _ = _train_task0(tmp_path, "ewc")
    trainer.save_model(str(tmp_path / "saved"))
    other = ContinualTrainer(model=tiny_bert(0, intermediate_size=40), args=_args(tmp_path, "ewc"))
    with pytest.raises(
        ContinualStateError, match=r"intermediate\.dense\.weight saved \[48, 32\] vs model \[40, 32\]"
    ):
        other.load_continual_state(tmp_path / "saved")
    wrong_method = ContinualTrainer(model=tiny_bert(0), args=_args(tmp_path, "kfac"))
    with pytest.raises(ValueError, match="saved by method 'ewc'"):
        wrong_method.load_continual_state(tmp_path / "saved")


def test_no_half_written_state_files(tmp_path):
    trainer, _ = _train_task0(tmp_path, "ewc")
    trainer.save_model(str(tmp_path / "saved"))
    leftovers = [
        p.name for p in (tmp_path / "saved").iterdir() if p.name.startswith(".") or p.suffix == ".tmp"
    ]
    assert leftovers == []


def test_continue_from_saved_directory_equals_same_process(tmp_path):
    trainer, tasks = _train_task0(tmp_path, "ewc")
    trainer.save_model(str(tmp_path / "published"))
    # same process: go on with task 2
    trainer.train_dataset = tasks[1].train_dataset
    trainer.train()
    same = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    # months later, without task 1's data: load the published directory and train task 2
    model = BertForSequenceClassification.from_pretrained(tmp_path / "published")
    later = ContinualTrainer(model=model, args=_args(tmp_path, "ewc"), train_dataset=tasks[1].train_dataset)
    later.load_continual_state(tmp_path / "published")
    later.train()
    for n, p in later.model.named_parameters():
        torch.testing.assert_close(p.detach(), same[n], rtol=1e-5, atol=1e-6)
