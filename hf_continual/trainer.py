"""ContinualTrainer: a drop-in ``Trainer`` that protects earlier tasks while it learns new ones."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import enable_full_determinism, set_seed

from .config import ContinualConfig
from .methods import ContinualMethod, build_method
from .state import check_parameters_match, has_state, load_state, save_state


class _AfterOptimizerStep(TrainerCallback):
    """Runs the method's ``after_optimizer_step`` right after every ``optimizer.step()``."""

    def __init__(self, trainer: ContinualTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.method.after_optimizer_step(self.trainer.model)


def refuse_sharded_training(method: str, args: Any, distributed_type: Any) -> None:
    """Raise for a curvature or mask method under sharded training (FSDP / DeepSpeed ZeRO).

    The Fisher, K-FAC factors and masks are per whole parameter tensor: estimating them on shards would be
    silently wrong. ``args`` is the ``TrainingArguments`` (its ``fsdp`` / ``deepspeed`` fields are read),
    ``distributed_type`` the accelerator's ``DistributedType``.
    """
    from accelerate.utils import DistributedType

    if method in ("none", "replay", "joint"):
        return
    sharded = distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None) or sharded:
        raise ValueError(
            f"continual_method={method!r} does not support sharded training (FSDP / DeepSpeed "
            "ZeRO): the Fisher, K-FAC factors and masks need whole parameter tensors on every process. "
            "Supported: one process, or DDP over several GPUs/nodes/CPU processes (accelerate MULTI_GPU, "
            "torchrun)."
        )


class ContinualTrainer(Trainer):
    """``Trainer`` with task boundaries and a continual method (see :mod:`hf_continual.methods`).

    Usage: ``trainer.train(); trainer.end_task()`` per task, switching ``trainer.train_dataset`` in between. Each
    ``train()`` call starts a fresh optimizer and learning-rate schedule (unless you passed ``optimizers=``).

    Loss scaling: transformers 5 multiplies the loss by the number of processes and skips the division by the
    gradient-accumulation steps when the model's ``forward`` takes ``**kwargs`` (BERT does), assuming the model
    normalised its loss by ``num_items_in_batch`` - BERT heads do not. We treat every model loss as a per-batch
    mean (``model_accepts_loss_kwargs = False``), so the update of one global batch is the same with 1 process,
    with gradient accumulation and with several processes, and the penalty keeps its weight relative to the task.
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
        super().__init__(model, args, *posargs, **kwargs)
        if self.compute_loss_func is None:
            self.model_accepts_loss_kwargs = False
        self.method: ContinualMethod = build_method(args)
        self._refuse_sharded_training()
        self.add_callback(_AfterOptimizerStep(self))
        self._penalty_sum = 0.0
        self._penalty_count = 0

    def _refuse_sharded_training(self) -> None:
        refuse_sharded_training(self.method.name, self.args, self.accelerator.distributed_type)

    # ---- task boundaries ---------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """Train on ``self.train_dataset`` (mixed with old data for replay/joint) with a fresh optimizer."""
        if not self._user_optimizers:
            self.optimizer, self.lr_scheduler = None, None
        # each task starts from a seed of its own: reproducible, resumable streams. Also when resuming: the
        # shuffling sampler takes its seed from torch.initial_seed() (the checkpoint's RNG state is restored
        # later, by the Trainer), so a resumed task replays the same data order.
        task_seed = self.args.seed + len(self.method.tasks_seen)
        enable_full_determinism(task_seed) if self.args.full_determinism else set_seed(task_seed)
        task_dataset = self.train_dataset
        self.train_dataset = self.method.prepare_train_dataset(task_dataset)
        try:
            self.method.on_task_begin(self, task_dataset)
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
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
        name = task_name or f"task_{len(self.method.tasks_seen)}"
        self.model.eval()
        self.method.end_task(self, dataset, name)

    def create_optimizer(self, *args: Any, **kwargs: Any):
        """The Trainer's optimizer, then the method's adjustment (before the LR scheduler is built)."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(*args, **kwargs)
        if fresh and not self._user_optimizers:
            self.method.configure_optimizer(self.optimizer)
        return optimizer

    # ---- the one place per optimizer step where the penalty gradient is added ------------------------------
    def _get_grad_norm(self, model, grad_norm=None):
        """Called once per optimizer step after accumulation, all-reduce and (when on) clipping, right before
        ``optimizer.step()``: the penalty gradient is added here, so ``max_grad_norm`` clips the task gradient
        only and the logged ``grad_norm`` is the task gradient's.

        With the penalty added before clipping, a penalty gradient above ``max_grad_norm`` made the clip rescale
        every step by a distance-dependent factor; measured on the dev stream (K-FAC, lambda 1e5): forgetting
        2.50 points that way, 0.50 this way (``bench/clip_check.py``).
        """
        out = super()._get_grad_norm(model, grad_norm=grad_norm)
        value = self.method.apply_gradients(self.model)
        if value is not None:
            self._penalty_sum += float(value)
            self._penalty_count += 1
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._penalty_count and "loss" in logs:
            logs["continual_penalty"] = round(self._penalty_sum / self._penalty_count, 6)
            self._penalty_sum, self._penalty_count = 0.0, 0
        super().log(logs, start_time)

    # ---- continual state travels with weights and checkpoints --------------------------------------------
    def continual_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, metadata) of the method plus the config and the model's parameter shapes."""
        tensors, meta = self.method.state_dict()
        record = {
            "method": self.method.name,
            "method_state": meta,
            "config": self.args.continual_dict(),
            "parameter_shapes": {n: list(p.shape) for n, p in self.model.named_parameters()},
        }
        return tensors, record

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            tensors, record = self.continual_state()
            save_state(output_dir, tensors, record)

    def load_continual_state(self, directory: str | os.PathLike) -> None:
        """Restore the method's state saved by :meth:`save_model` (e.g. from a published model directory)."""
        tensors, record = load_state(directory)
        if record.get("method") != self.method.name:
            raise ValueError(
                f"{directory}: continual state was saved by method {record.get('method')!r} but this trainer "
                f"runs continual_method={self.method.name!r}"
            )
        check_parameters_match(self.model, record.get("parameter_shapes", {}), directory)
        self.method.load_state_dict(tensors, record["method_state"])

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        if has_state(resume_from_checkpoint):
            self.load_continual_state(resume_from_checkpoint)
