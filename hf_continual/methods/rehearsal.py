"""Rehearsal methods: they change the training data (joint: all tasks so far; replay: a buffer per past task).

A Trainer callback cannot change what a Trainer trains on; ``ContinualTrainer`` mixes the data in by itself, and a
plain-Trainer user passes ``callback.prepare_train_dataset(task_dataset)`` as the Trainer's ``train_dataset``.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from .base import ContinualMethod, MethodContext, concat_datasets, subset
from .registry import register_method

if TYPE_CHECKING:
    from ..config import ContinualConfig


@register_method("joint")
class JointTraining(ContinualMethod):
    """Upper reference: each task trains on the union of all tasks' training data seen so far."""

    def __init__(self, config: ContinualConfig) -> None:
        super().__init__(config)
        self.past: list[Any] = []

    def prepare_train_dataset(self, dataset: Any) -> Any:
        return concat_datasets([*self.past, dataset])

    def end_task(self, ctx: MethodContext, train_dataset: Any, task_name: str) -> None:
        super().end_task(ctx, train_dataset, task_name)
        self.past.append(train_dataset)

    def restore_past_data(self, datasets: list[Any]) -> None:
        self.past = list(datasets)


@register_method("replay")
class Replay(ContinualMethod):
    """Experience replay: a fixed budget (``replay_per_task``) of stored examples per past task is mixed in.

    The buffer is drawn uniformly with a seed derived from ``config.seed`` and the task index, so every process
    stores the same examples.
    """

    config_fields = ("replay_per_task",)

    def __init__(self, config: ContinualConfig) -> None:
        super().__init__(config)
        self.buffers: list[Any] = []

    def prepare_train_dataset(self, dataset: Any) -> Any:
        return concat_datasets([*self.buffers, dataset])

    def end_task(self, ctx: MethodContext, train_dataset: Any, task_name: str) -> None:
        super().end_task(ctx, train_dataset, task_name)
        self.buffers.append(self._buffer(train_dataset, len(self.buffers)))

    def _buffer(self, dataset: Any, task_index: int) -> Any:
        rng = random.Random(self.config.seed * 1000 + task_index)
        n = min(self.config.replay_per_task, len(dataset))
        return subset(dataset, sorted(rng.sample(range(len(dataset)), n)))

    def restore_past_data(self, datasets: list[Any]) -> None:
        self.buffers = [self._buffer(d, i) for i, d in enumerate(datasets)]
