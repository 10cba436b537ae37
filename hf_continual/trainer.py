"""ContinualTrainer: a drop-in ``Trainer`` that protects earlier tasks while it learns new ones.

A thin convenience over :class:`~hf_continual.callbacks.ContinualCallback` (the one code path for every method):
it adds the callback, mixes replay / joint data in, starts each task with a fresh optimizer and a seed of its
own, lets FISH regroup the fresh optimizer, saves the continual state beside the weights, and corrects the loss
scaling of transformers 5 for models that take ``**kwargs``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_utils import enable_full_determinism, get_last_checkpoint, set_seed

from .callbacks import ContinualCallback, refuse_sharded_training
from .config import ContinualConfig
from .methods import ContinualMethod
from .state import has_state

__all__ = ["ContinualTrainer", "refuse_sharded_training"]


class ContinualTrainer(Trainer):
    """``Trainer`` with task boundaries and a continual method (see :mod:`hf_continual.methods`).

    Usage: ``trainer.train(); trainer.end_task()`` per task, switching ``trainer.train_dataset`` in between. Each
    ``train()`` call starts a fresh optimizer and learning-rate schedule (unless you passed ``optimizers=``).

    Loss scaling: transformers 5 multiplies the loss by the number of processes and skips the division by the
    gradient-accumulation steps when the model's ``forward`` takes ``**kwargs`` (BERT does), assuming the model
    normalised its loss by ``num_items_in_batch`` - BERT heads do not. We treat every model loss as a per-batch
    mean (``model_accepts_loss_kwargs = False``), so the update of one global batch is the same with 1 process,
    with gradient accumulation and with several processes, and the penalty keeps its weight relative to the task.
    A plain ``Trainer`` with the callback keeps transformers' scaling (see README, "Drop-in").
    """

    def __init__(
        self, model: Any = None, args: ContinualConfig | None = None, *posargs: Any, **kwargs: Any
    ) -> None:
        if args is None:
            args = ContinualConfig(output_dir="trainer_output")
        if not isinstance(args, ContinualConfig):
            raise TypeError(
                f"ContinualTrainer needs args=ContinualConfig(...), got {type(args).__name__}; "
                "ContinualConfig accepts every TrainingArguments field"
            )
        self._user_optimizers = kwargs.get("optimizers", (None, None))[0] is not None
        # a fresh optimizer object per task (train()); one passed in by the user keeps its state across tasks
        self.continual = ContinualCallback(config=args, reset_optimizer=not self._user_optimizers)
        super().__init__(model, args, *posargs, **kwargs)
        if self.compute_loss_func is None:
            self.model_accepts_loss_kwargs = False
        self.continual.check_args(self.args, self.accelerator.distributed_type)
        # first in line: the penalty it adds to a log reaches the reporters and printers after it
        self.callback_handler.callbacks.insert(0, self.continual)

    @property
    def method(self) -> ContinualMethod:
        """The continual method (its state: ``tasks_seen``, penalty terms, FISH masks, ...)."""
        return self.continual.method

    @method.setter
    def method(self, value: ContinualMethod) -> None:
        self.continual.method = value

    # ---- task boundaries ---------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """Train on ``self.train_dataset`` (mixed with old data for replay/joint) with a fresh optimizer."""
        if not self._user_optimizers:
            self.optimizer, self.lr_scheduler = None, None
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint and has_state(resume_from_checkpoint):  # first: the task count is in it
            self.continual.load_state(resume_from_checkpoint, self.model)
        # each task starts from a seed of its own: reproducible, resumable streams. Also when resuming: the
        # shuffling sampler takes its seed from torch.initial_seed() (the checkpoint's RNG state is restored
        # later, by the Trainer), so a resumed task replays the same data order.
        task_seed = self.args.seed + len(self.method.tasks_seen)
        enable_full_determinism(task_seed) if self.args.full_determinism else set_seed(task_seed)
        task_dataset = self.train_dataset
        self.train_dataset = self.continual.prepare_train_dataset(task_dataset)
        try:
            if not resume_from_checkpoint:
                self.continual.begin_task(self.model, task_dataset, self.data_collator)
            return super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)
        finally:
            self.train_dataset = task_dataset

    def end_task(self, train_dataset: Any = None, task_name: str | None = None) -> None:
        """Consolidate after a task: estimate what protects it (Fisher, factors, anchors, buffers).

        ``train_dataset`` defaults to the dataset just trained on (without replayed examples). Every process
        must call it (the Fisher is reduced across processes).
        """
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if dataset is None:
            raise ValueError("end_task needs the task's train_dataset (none was given and trainer has none)")
        self.continual.end_task(self.model, dataset, data_collator=self.data_collator, task_name=task_name)

    def create_optimizer(self, *args: Any, **kwargs: Any):
        """The Trainer's optimizer, then the method's adjustment (before the LR scheduler is built)."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(*args, **kwargs)
        if fresh and not self._user_optimizers:
            self.continual.configure_optimizer(self.optimizer)
        return optimizer

    # ---- continual state travels with weights, checkpoints and Hub pushes ----------------------------------
    def continual_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, metadata) of the method plus the config and the model's parameter shapes."""
        return self.continual.state_dict(self.model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Weights, then the continual state beside them (checkpoints get it from the callback's ``on_save``)."""
        super().save_model(output_dir, _internal_call=_internal_call)
        checkpoint_save = _internal_call and output_dir is not None
        if self.args.should_save and not checkpoint_save:
            self.continual.save_state(
                output_dir if output_dir is not None else self.args.output_dir, self.model
            )

    def load_continual_state(self, directory: str | os.PathLike) -> None:
        """Restore the method's state saved by :meth:`save_model` (e.g. from a published model directory)."""
        self.continual.load_state(directory, self.model)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The continual model card as ``README.md`` in ``args.output_dir`` (what ``push_to_hub`` uploads): from
        the stream's ``results.json`` there when it exists (accuracy matrix, metrics), else from the continual
        state (method, tasks seen, hyper-parameters). Takes the Trainer's keyword arguments; ``finetuned_from``
        and ``license`` are used, the others are Trainer-card fields with no place in this card."""
        if not self.is_world_process_zero():
            return
        from .modelcard import write_model_card
        from .stream import RESULTS_FILE, load_results

        results_path = os.path.join(self.args.output_dir, RESULTS_FILE)
        if os.path.isfile(results_path):
            results = load_results(results_path)
        else:
            results = {
                "method": self.method.name,
                "tasks": list(self.method.tasks_seen),
                "config": {**self.args.to_yaml_dict(), **self.args.continual_dict()},
            }
        write_model_card(
            self.args.output_dir,
            results,
            model_name=kwargs.get("model_name"),
            base_model=kwargs.get("finetuned_from"),
            license=kwargs.get("license"),
        )
