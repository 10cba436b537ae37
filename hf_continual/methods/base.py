"""The method interface, the small context its hooks receive, and plain sequential fine-tuning (``none``).

A method never sees a Trainer. :class:`~hf_continual.callbacks.ContinualCallback` drives it at these points:

* ``prepare_train_dataset(dataset)`` - what to train on for the new task (replay / joint mix in old data; a
  callback cannot change a Trainer's data, so the user or ``ContinualTrainer`` applies it);
* ``begin_task(ctx, dataset)``       - before the first step of a task (e.g. FISH builds its mask);
* ``configure_optimizer(optimizer)`` - a task's fresh optimizer before its LR schedule exists (FISH regroups it;
  only ``ContinualTrainer`` can call it at that moment);
* ``apply_gradients(model)``         - once per optimizer step, after accumulation, all-reduce and clipping,
  right before ``optimizer.step()`` (``on_pre_optimizer_step``): adds the penalty gradient ``lambda * F delta``
  in closed form and returns the penalty value as a detached tensor (no device sync);
* ``after_optimizer_step(model)``    - right after ``optimizer.step()`` (``on_optimizer_step``);
* ``end_task(ctx, dataset, name)``   - task boundary: consolidate (Fisher, factors, anchors, replay buffer).

``state_dict`` / ``load_state_dict`` make everything a method needs to protect old tasks travel with the model.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .registry import register_method

if TYPE_CHECKING:
    from ..config import ContinualConfig

logger = logging.getLogger(__name__)


@dataclass
class MethodContext:
    """What a method's task-boundary hooks may use: the model, the continual config, the collator of the task's
    data (None: ``transformers.default_data_collator``) and the process group Fisher sums are reduced over
    (None: the default group when ``torch.distributed`` is initialised)."""

    model: torch.nn.Module
    config: ContinualConfig
    data_collator: Callable | None = None
    process_group: Any = None


def concat_datasets(parts: list[Any]) -> Any:
    """Concatenate task datasets: ``datasets.concatenate_datasets`` when all are HF datasets, else ConcatDataset."""
    parts = [p for p in parts if p is not None and len(p) > 0]
    if len(parts) == 1:
        return parts[0]
    try:
        import datasets

        if all(isinstance(p, datasets.Dataset) for p in parts):
            return datasets.concatenate_datasets(parts)
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    return torch.utils.data.ConcatDataset(parts)


def subset(dataset: Any, indices: list[int]) -> Any:
    """Rows ``indices`` of a HF dataset (``select``) or any torch dataset (``Subset``)."""
    if hasattr(dataset, "select"):
        return dataset.select(indices)
    return torch.utils.data.Subset(dataset, indices)


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Named parameters that receive gradients (the ones a penalty or mask can act on)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def fp32_copy(p: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``p`` in at least fp32 (bf16/fp16 -> fp32, fp64 stays fp64), on ``p``'s device.

    Anchors and curvature are kept in fp32 whatever the model's dtype: the penalty is a small difference
    ``theta - theta*`` that bf16 (8 bits of mantissa) would round away.
    """
    return p.detach().to(dtype=torch.promote_types(p.dtype, torch.float32), copy=True)


def place_like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``t`` (an anchor or start value of parameter ``p``) on ``p``'s device in ``p``'s dtype, never below
    fp32 (``t`` itself when already there)."""
    return t.to(device=p.device, dtype=torch.promote_types(p.dtype, torch.float32))


def continual_field_defaults() -> dict[str, Any]:
    """The continual fields of ``ContinualConfig`` (not those of ``TrainingArguments``) and their defaults."""
    from transformers import TrainingArguments

    from ..config import ContinualConfig

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    out = {}
    for f in dataclasses.fields(ContinualConfig):
        if f.name in base:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


class ContinualMethod:
    """Plain sequential fine-tuning; the base class of every method (all hooks are no-ops)."""

    name = "none"
    #: the continual config fields this method reads (besides ``continual_method``); others get a warning
    config_fields: ClassVar[tuple[str, ...]] = ()
    #: whether the method needs whole parameter tensors on every process (curvature, masks): no FSDP / ZeRO
    needs_full_parameters: ClassVar[bool] = False
    #: whether the first task (nothing to protect yet) trains exactly as under plain fine-tuning, so that runs of
    #: different methods may share its result (``run_stream(first_task_dir=...)``); FISH's is already masked
    plain_first_task: ClassVar[bool] = True

    def __init__(self, config: ContinualConfig) -> None:
        self.config = config
        self.tasks_seen: list[str] = []

    @classmethod
    def used_fields(cls, config: ContinualConfig) -> set[str]:
        """Continual config fields that influence this method under ``config``."""
        return {"continual_method", *cls.config_fields}

    @classmethod
    def warn_unused_fields(cls, config: ContinualConfig) -> None:
        """Warn (once per call) about continual fields set away from their default that this method ignores."""
        used = cls.used_fields(config)
        ignored = sorted(
            n
            for n, default in continual_field_defaults().items()
            if n not in used and getattr(config, n) != default
        )
        if ignored:
            warnings.warn(
                f"continual_method={cls.name!r} does not use {', '.join(ignored)} (set away from the default); "
                "they have no effect",
                UserWarning,
                stacklevel=4,
            )

    # ---- hooks -------------------------------------------------------------------------------------------
    @property
    def task_in_progress(self) -> bool:
        """True between ``begin_task`` and ``end_task`` when the method holds per-task state (FISH's mask)."""
        return False

    def prepare_train_dataset(self, dataset: Any) -> Any:
        return dataset

    def begin_task(self, ctx: MethodContext, train_dataset: Any) -> None:
        return None

    def configure_optimizer(self, optimizer: torch.optim.Optimizer) -> bool:
        """Adjust a freshly created optimizer (before its LR scheduler exists); once per task. Returns whether
        the optimizer was changed."""
        return False

    def apply_gradients(self, model: torch.nn.Module) -> torch.Tensor | None:
        return None

    def after_optimizer_step(self, model: torch.nn.Module) -> None:
        return None

    def end_task(self, ctx: MethodContext, train_dataset: Any, task_name: str) -> None:
        self.tasks_seen.append(task_name)

    def restore_past_data(self, datasets: list[Any]) -> None:
        """Give back the training data of the tasks already seen (after loading state to resume a stream);
        only methods that keep data (replay, joint) use it."""
        return None

    # ---- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON metadata) describing everything needed to protect the tasks seen so far."""
        return {}, {"tasks_seen": list(self.tasks_seen)}

    def load_state_dict(
        self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], model: torch.nn.Module | None = None
    ) -> None:
        """Inverse of :meth:`state_dict`; ``model`` is the model the state will act on (FISH re-attaches the
        mask of a task in progress to it; the state is placed on it, see :meth:`place_`)."""
        self.tasks_seen = list(meta.get("tasks_seen", []))

    def place_(self, model: torch.nn.Module) -> None:
        """Put every tensor of the state where the parameter it belongs to lives, once (at load, and when
        training starts, since the Trainer may move the model after a load): the per-step work then makes no
        host-device copies. Anchors take their parameter's dtype, never below fp32; curvature is fp32."""
        return None


register_method("none")(ContinualMethod)
