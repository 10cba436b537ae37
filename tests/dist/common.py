"""Shared by the single-process tests and the torchrun scripts: one optimizer step on a fixed global batch."""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist

from hf_continual import ContinualConfig, ContinualTrainer
from hf_continual.toy import tiny_bert, toy_stream


def _close_process_group() -> None:
    """Destroy the gloo group before the interpreter shuts down. Left to interpreter shutdown, gloo's threads can
    abort a process that had finished its work ("terminate called without an active exception", SIGABRT: seen
    once in CI after scaling_dist.py had written its results). No barrier: a rank that failed must not hang the
    others at exit."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


atexit.register(_close_process_group)  # for the torchrun scripts that import this module

GLOBAL_BATCH = 8
#: the FISH mask built after one step (``one_step_params(method="fish", **FISH_MASK_OPTIONS)``), on 1 and 2 processes
FISH_MASK_OPTIONS = dict(fish_keep_ratio=0.05, fish_num_samples=8)
#: after the prior task the parameters are moved this far (seeded noise, the same on every rank) so that the
#: penalty gradient of the next step is far from zero
MOVE_FROM_ANCHOR = 0.05


def one_step_params(
    output_dir: str,
    per_device_batch: int,
    grad_accum: int,
    trainer_cls=ContinualTrainer,
    method: str = "none",
    prior_task: bool = False,
    return_trainer: bool = False,
    **overrides,
) -> dict[str, torch.Tensor]:
    """Train one SGD step on the 8 examples of toy task 1 and return the parameters.

    With ``prior_task`` the model first trains toy task 0 and consolidates it (``end_task``), then every
    parameter is moved ``MOVE_FROM_ANCHOR`` * N(0, 1) away from its anchor (a seeded draw, identical on every
    rank): the step under test starts with a non-zero penalty gradient, so a penalty scaled by the number of
    accumulation steps or processes changes the update.
    """
    tasks = toy_stream(n_train=GLOBAL_BATCH, n_eval=4, seed=3)
    model = tiny_bert(seed=1)
    common = dict(
        output_dir=output_dir,
        use_cpu=os.environ.get("HF_CONTINUAL_TEST_DEVICE", "cpu") == "cpu",  # "cuda": DDP over NCCL
        report_to="none",
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        num_train_epochs=1,
        seed=0,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
        continual_method=method,
        continual_lambda=50.0,
        fisher_batch_size=4,
        dataloader_drop_last=False,
    )
    common.update(overrides)
    args_cls = ContinualConfig if trainer_cls is ContinualTrainer else _plain_args
    if prior_task:  # the same global batch of 8 for the prior task whatever the number of processes
        world = int(os.environ.get("WORLD_SIZE", "1"))
        warm = ContinualConfig(**{**common, "per_device_train_batch_size": GLOBAL_BATCH // world})
        t0 = ContinualTrainer(model=model, args=warm, train_dataset=tasks[0].train_dataset)
        t0.train()
        t0.end_task(tasks[0].train_dataset, task_name="t0")
        method_state = t0.method
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(MOVE_FROM_ANCHOR * torch.randn(p.shape, generator=gen).to(p.dtype))
    args = args_cls(
        **{
            **common,
            "per_device_train_batch_size": per_device_batch,
            "gradient_accumulation_steps": grad_accum,
        }
    )
    trainer = trainer_cls(model=model, args=args, train_dataset=tasks[1].train_dataset)
    if prior_task:
        trainer.method = method_state
    trainer.train()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    if return_trainer:
        return params, trainer
    return params


def _plain_args(**kwargs):
    from transformers import TrainingArguments

    kwargs = {k: v for k, v in kwargs.items() if not (k.startswith("continual_") or k.startswith("fisher_"))}
    return TrainingArguments(**kwargs)
