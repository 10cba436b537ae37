"""ContinualCallback: every continual method on any ``transformers.Trainer`` (the one code path).

Hook points (see ``Trainer._inner_training_loop``):

* ``on_train_begin``        - a task starts: FISH builds its mask from the Trainer's training data (unless
  :meth:`ContinualCallback.begin_task` was called for it); a resumed checkpoint's continual state is loaded;
  the optimizer's state is cleared when a reused Trainer starts a new task (a fresh optimizer per task).
* ``on_pre_optimizer_step`` - fires once per optimizer step after gradient accumulation, the DDP all-reduce and
  ``max_grad_norm`` clipping, right before ``optimizer.step()``: the gradients are final there, so the penalty
  gradient ``lambda * F (theta - theta*)`` is added whole (not clipped) and the logged ``grad_norm`` is the task
  gradient's. The penalty value is kept as a detached device tensor (no per-step host sync).
* ``on_optimizer_step``     - right after ``optimizer.step()``: FISH puts frozen entries back when the optimizer
  could not be regrouped.
* ``on_log``                - the mean penalty since the last log is added as ``continual_penalty`` (read from the
  device only here).
* ``on_save``               - the continual state is written into the checkpoint folder, so a checkpoint of a
  plain Trainer carries it; ``on_train_begin`` of a resumed run reads it back.

Task boundaries are explicit: ``cb.end_task(model, train_dataset, data_collator=..., task_name=...)``.

Replay and joint training change the training data, which a callback cannot do: pass
``cb.prepare_train_dataset(task_dataset)`` as the Trainer's ``train_dataset`` (``ContinualTrainer`` does it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import ContinualConfig
from .methods import METHOD_REGISTRY, ContinualMethod, MethodContext, build_method
from .state import check_parameters_match, has_state, load_state, save_state

logger = logging.getLogger(__name__)

__all__ = ["ContinualCallback", "refuse_sharded_training"]


def _continual_field_names() -> set[str]:
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {f.name for f in dataclasses.fields(ContinualConfig) if f.init and f.name not in base}


def refuse_sharded_training(method: str, args: Any, distributed_type: Any) -> None:
    """Raise for a curvature or mask method under sharded training (FSDP / DeepSpeed ZeRO).

    The Fisher, K-FAC factors and masks are per whole parameter tensor: estimating them on shards would be
    silently wrong. ``args`` is the ``TrainingArguments`` (its ``fsdp`` / ``deepspeed`` fields are read),
    ``distributed_type`` the accelerator's ``DistributedType``; which methods need whole tensors is declared by
    each method (``needs_full_parameters``).
    """
    from accelerate.utils import DistributedType

    if not METHOD_REGISTRY[method].needs_full_parameters:
        return
    sharded = distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None) or sharded:
        raise ValueError(
            f"continual_method={method!r} does not support sharded training (FSDP / DeepSpeed "
            "ZeRO): the Fisher, K-FAC factors and masks need whole parameter tensors on every process. "
            "Supported: one process, or DDP over several GPUs/nodes/CPU processes (accelerate MULTI_GPU, "
            "torchrun)."
        )


class ContinualCallback(TrainerCallback):
    """Adds a continual method (EWC, online EWC, K-FAC, FISH, replay, joint) to any ``transformers.Trainer``.

    Build it from a config, ``ContinualCallback(config=ContinualConfig(...))``, or from the continual fields,
    ``ContinualCallback(method="kfac", continual_lambda=1e6)``. Built from fields, the callback takes ``seed`` and
    ``disable_tqdm`` from the Trainer's arguments when training begins. One callback object carries the
    continual state across tasks, whether one Trainer is reused or a new Trainer is built per task::

        cb = ContinualCallback(method="ewc", continual_lambda=1e6)
        for name, data in tasks:
            trainer = Trainer(model=model, args=args, train_dataset=cb.prepare_train_dataset(data), callbacks=[cb])
            trainer.train()
            cb.end_task(model, data, data_collator=trainer.data_collator, task_name=name)

    Args:
        config: a :class:`~hf_continual.config.ContinualConfig` (its continual fields choose the method).
        method: the method name (``continual_method``), when no ``config`` is given.
        reset_optimizer: clear the optimizer's state (Adam moments) when a reused Trainer starts a new task, so
            every task starts with a fresh optimizer as with a new Trainer.
        process_group: ``torch.distributed`` group for the Fisher reductions (None: the default group).
        **fields: other continual fields (``continual_lambda``, ``fisher_type``, ``kfac_rank``, ...).
    """

    def __init__(
        self,
        config: ContinualConfig | None = None,
        *,
        method: str | None = None,
        reset_optimizer: bool = True,
        process_group: Any = None,
        **fields: Any,
    ) -> None:
        if config is not None:
            if method is not None or fields:
                raise TypeError("ContinualCallback: give config=... or method=/fields, not both")
            if not isinstance(config, ContinualConfig):
                raise TypeError(
                    f"ContinualCallback: config must be a ContinualConfig, got {type(config).__name__}"
                )
            self._fields_only = False
        else:
            known = _continual_field_names()
            unknown = sorted(set(fields) - known)
            if unknown:
                raise TypeError(
                    f"ContinualCallback: unknown continual field(s) {', '.join(unknown)}; "
                    f"known: {', '.join(sorted(known))}"
                )
            if method is not None:
                if fields.get("continual_method", method) != method:
                    raise TypeError("ContinualCallback: method= and continual_method= disagree")
                fields["continual_method"] = method
            config = ContinualConfig(output_dir="trainer_output", report_to="none", **fields)
            self._fields_only = True
        self.config = config
        self.method: ContinualMethod = build_method(config)
        self.reset_optimizer = reset_optimizer
        self.process_group = process_group
        self._task_open = False  # begin_task ran for the current task
        self._loaded_for_resume = False  # load_state ran for the coming resumed train()
        self._penalty_sum: torch.Tensor | None = None
        self._penalty_count = 0

    # ---- explicit API -------------------------------------------------------------------------------------
    def context(self, model: torch.nn.Module, data_collator: Callable | None = None) -> MethodContext:
        """The small context the method's task hooks receive."""
        return MethodContext(model, self.config, data_collator, self.process_group)

    def prepare_train_dataset(self, dataset: Any) -> Any:
        """What to train on for a new task: the task's data, plus old data for replay / joint."""
        return self.method.prepare_train_dataset(dataset)

    def begin_task(
        self, model: torch.nn.Module, train_dataset: Any, data_collator: Callable | None = None
    ) -> None:
        """Start a task explicitly (FISH: build the mask from ``train_dataset``). Optional: otherwise
        ``on_train_begin`` does it with the Trainer's training data and collator."""
        self.method.begin_task(self.context(model, data_collator), train_dataset)
        self._task_open = True

    def end_task(
        self,
        model: torch.nn.Module,
        train_dataset: Any,
        data_collator: Callable | None = None,
        task_name: str | None = None,
    ) -> None:
        """Consolidate after a task: estimate what protects it (Fisher, factors, anchors, buffers).

        ``train_dataset``: the task's own training data (without replayed examples); ``data_collator`` defaults to
        ``transformers.default_data_collator``. Every process must call it (the Fisher is reduced across them).
        """
        if train_dataset is None:
            raise ValueError("end_task needs the task's train_dataset")
        name = task_name or f"task_{len(self.method.tasks_seen)}"
        model.eval()
        self.method.end_task(self.context(model, data_collator), train_dataset, name)
        self._task_open = False

    def configure_optimizer(self, optimizer: torch.optim.Optimizer) -> bool:
        """Let the method adjust a fresh optimizer before its LR scheduler exists (FISH regroups AdamW so frozen
        entries need no per-step restore). Only a Trainer subclass can call it at that moment
        (``ContinualTrainer.create_optimizer`` does); without it FISH restores frozen entries after each step."""
        return self.method.configure_optimizer(optimizer)

    # ---- state --------------------------------------------------------------------------------------------
    def state_dict(self, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, record) of the method plus the config and the model's parameter shapes."""
        tensors, meta = self.method.state_dict()
        record = {
            "method": self.method.name,
            "method_state": meta,
            "config": self.config.continual_dict(),
            "parameter_shapes": {n: list(p.shape) for n, p in model.named_parameters()},
        }
        return tensors, record

    def save_state(self, directory: str | os.PathLike, model: torch.nn.Module) -> None:
        """Write ``continual_state.safetensors`` + ``continual_state.json`` into ``directory`` (atomically)."""
        tensors, record = self.state_dict(model)
        save_state(directory, tensors, record)

    def load_state(self, directory: str | os.PathLike, model: torch.nn.Module) -> None:
        """Restore the method's state saved by :meth:`save_state` (a checkpoint or a published model)."""
        tensors, record = load_state(directory)
        if record.get("method") != self.method.name:
            raise ValueError(
                f"{directory}: continual state was saved by method {record.get('method')!r} but this callback "
                f"runs continual_method={self.method.name!r}"
            )
        check_parameters_match(model, record.get("parameter_shapes", {}), directory)
        self.method.load_state_dict(tensors, record["method_state"], model)
        self._task_open = self.method.task_in_progress
        self._loaded_for_resume = True

    def check_args(self, args: TrainingArguments, distributed_type: Any = None) -> None:
        """Refuse sharded training (FSDP / DeepSpeed ZeRO) for methods that need whole parameter tensors."""
        if distributed_type is None:
            distributed_type = getattr(getattr(args, "distributed_state", None), "distributed_type", None)
        refuse_sharded_training(self.method.name, args, distributed_type)

    # ---- Trainer events -----------------------------------------------------------------------------------
    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        self.check_args(args)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ):
        self.check_args(args)
        if self._fields_only:  # TrainingArguments fields the methods read come from the Trainer
            self.config.seed = args.seed
            self.config.disable_tqdm = args.disable_tqdm
        self._penalty_sum, self._penalty_count = None, 0
        resumed = state.global_step > 0
        if resumed and not self._loaded_for_resume:
            checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if has_state(checkpoint):
                self.load_state(checkpoint, model)
            else:
                logger.warning(
                    f"resuming at step {state.global_step} but {checkpoint} holds no continual state; call "
                    "callback.load_state(directory, model) before train() when the checkpoint lives elsewhere"
                )
        self._loaded_for_resume = False
        # once per train(): the Trainer may have moved the model since the state was loaded
        self.method.place_(model)
        if not resumed and self.reset_optimizer and optimizer is not None:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
            if getattr(inner, "state", None):
                inner.state.clear()  # a reused Trainer keeps its optimizer: each task starts from fresh moments
        if not self._task_open and not self.method.task_in_progress:
            if train_dataloader is None:
                raise ValueError("ContinualCallback.on_train_begin: the Trainer gave no train_dataloader")
            collate = getattr(train_dataloader, "collate_fn", None)
            self.begin_task(model, train_dataloader.dataset, collate)
        return control

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ):
        value = self.method.apply_gradients(kwargs["model"])
        if value is not None:
            value = value.detach()
            self._penalty_sum = value if self._penalty_sum is None else self._penalty_sum + value
            self._penalty_count += 1

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ):
        self.method.after_optimizer_step(kwargs["model"])

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ):
        if logs is None or not self._penalty_count or "loss" not in logs:
            return
        value = round(float(self._penalty_sum) / self._penalty_count, 6)  # the one host read per log
        self._penalty_sum, self._penalty_count = None, 0
        logs["continual_penalty"] = value
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1]["continual_penalty"] = value

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and os.path.isdir(checkpoint):
            self.save_state(checkpoint, kwargs["model"])

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._loaded_for_resume = False
