import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer

from hf_continual import ContinualConfig, ContinualTrainer
from hf_continual.toy import tiny_bert, toy_config, toy_stream

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from common import GLOBAL_BATCH, one_step_params  # noqa: E402


def _assert_same(a, b, atol=1e-6):
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


def test_grad_accumulation_gives_same_update(tmp_path):
    full = one_step_params(str(tmp_path / "a"), per_device_batch=GLOBAL_BATCH, grad_accum=1)
    accum = one_step_params(str(tmp_path / "b"), per_device_batch=GLOBAL_BATCH // 2, grad_accum=2)
    _assert_same(full, accum)


def test_plain_trainer_scales_bert_loss_wrongly(tmp_path):
    """The transformers 5 behaviour we correct: a plain Trainer with GA=2 takes a 2x larger step on BERT."""
    start = {n: p.detach().clone() for n, p in tiny_bert(seed=1).named_parameters()}
    full = one_step_params(str(tmp_path / "a"), GLOBAL_BATCH, 1, trainer_cls=Trainer)
    accum = one_step_params(str(tmp_path / "b"), GLOBAL_BATCH // 2, 2, trainer_cls=Trainer)
    name = "classifier.weight"
    ratio = (accum[name] - start[name]).norm() / (full[name] - start[name]).norm()
    assert ratio == pytest.approx(2.0, rel=1e-3)


def test_two_processes_give_same_update(tmp_path, scaling_dist_runs):
    single = one_step_params(str(tmp_path / "a"), per_device_batch=GLOBAL_BATCH, grad_accum=1)
    rank0, rank1 = scaling_dist_runs["none"]
    _assert_same(rank0, rank1, atol=0)
    _assert_same(single, rank0)


def test_fresh_optimizer_and_schedule_per_task(tmp_path):
    """Task 2 starts with a new optimizer and a learning-rate schedule that starts again at the peak.

    A reused scheduler would hand task 2 the exhausted rate of task 1's end (0 with the linear schedule): the
    learning rate of every step is read where the optimizer uses it. Checked by breaking the code on purpose:
    with the scheduler kept across tasks (neither ours nor the Trainer's own reset) task 2 ran at a constant
    1e-3 and this test failed.
    """
    from transformers import TrainerCallback

    tasks = toy_stream(n_train=32, n_eval=8)
    args = ContinualConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=8,
        num_train_epochs=1,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=0,
        save_strategy="no",
        disable_tqdm=True,
    )
    rates: list[list[float]] = []

    class Rates(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            rates.append([])

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            rates[-1].append(optimizer.param_groups[0]["lr"])

    trainer = ContinualTrainer(
        model=tiny_bert(), args=args, train_dataset=tasks[0].train_dataset, callbacks=[Rates()]
    )
    trainer.train()
    first_opt = trainer.optimizer
    trainer.end_task()
    trainer.train_dataset = tasks[1].train_dataset
    trainer.train()
    assert trainer.optimizer is not first_opt
    assert trainer.state.global_step == 4  # counted afresh for the new task
    assert trainer.method.tasks_seen == ["task_0"]
    # linear decay over 4 steps from 1e-3, for each task: 1e-3, 7.5e-4, 5e-4, 2.5e-4
    expected = [1e-3 * (1 - s / 4) for s in range(4)]
    assert len(rates) == 2
    for task_rates in rates:
        assert task_rates == pytest.approx(expected, rel=1e-6)


def test_rejects_plain_training_arguments(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="ContinualConfig"):
        ContinualTrainer(model=tiny_bert(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True))


def test_end_task_without_dataset_is_an_error(tmp_path):
    args = ContinualConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = ContinualTrainer(model=tiny_bert(), args=args)
    with pytest.raises(ValueError, match="train_dataset"):
        trainer.end_task()


def test_penalty_gradient_is_added_after_clipping(tmp_path):
    """The task gradient is clipped to max_grad_norm; the closed-form penalty gradient is added afterwards, whole."""
    from transformers import TrainerCallback

    tasks = toy_stream(n_train=64, n_eval=16)
    max_norm = 1e-3
    args = toy_config(
        str(tmp_path / "run"),
        "ewc",
        continual_lambda=1e6,
        max_grad_norm=max_norm,
        num_train_epochs=1,
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        fisher_num_samples=32,
    )
    trainer = ContinualTrainer(model=tiny_bert(0), args=args, train_dataset=tasks[0].train_dataset)
    trainer.train()
    trainer.end_task(task_name="a")
    seen = []

    class Probe(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            params = dict(trainer.model.named_parameters())
            total = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
            for p in params.values():
                p.grad = None
            trainer.method.apply_gradients(trainer.model)  # the penalty gradient alone, at these weights
            penalty = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
            for n, p in params.items():
                p.grad = total.get(n)
            task = [total[n] - penalty.get(n, 0) for n in total]
            seen.append((torch.linalg.vector_norm(torch.stack([t.norm() for t in task])), penalty))

    trainer.add_callback(Probe())
    trainer.train_dataset = tasks[1].train_dataset
    trainer.train()
    assert len(seen) == 4
    for task_norm, penalty in seen:
        pen_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in penalty.values()]))
        # the task gradient was clipped (up to the rounding of total - penalty)
        assert task_norm <= max_norm * 1.001 + 1e-6 * pen_norm, (task_norm, pen_norm)
    assert pen_norm > 100 * max_norm  # the penalty gradient was added after clipping, unscaled
