"""Continual methods and their registry (method name -> implementation, PEFT-style).

A method plugs into :class:`~hf_continual.trainer.ContinualTrainer` at five points:

* ``prepare_train_dataset`` - what the Trainer trains on for the new task (replay / joint mix in old data);
* ``on_task_begin``         - before the first step of a task (e.g. FISH builds its mask);
* ``apply_gradients``       - once per optimizer step, after gradient accumulation and all-reduce and before
  clipping and ``optimizer.step()``: adds the penalty gradient ``lambda * F delta`` in closed form and returns
  the penalty value for logging;
* ``after_optimizer_step``  - right after ``optimizer.step()`` (e.g. FISH restores frozen entries);
* ``end_task``              - task boundary: consolidate (Fisher, factors, anchors, replay buffer).

``state_dict`` / ``load_state_dict`` make everything a method needs to protect old tasks travel with the model.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import torch

from .curvature.base import Curvature

if TYPE_CHECKING:
    from .config import ContinualConfig
    from .trainer import ContinualTrainer

METHOD_REGISTRY: dict[str, type[ContinualMethod]] = {}


def register_method(name: str):
    """Class decorator: make a :class:`ContinualMethod` available as ``continual_method=name``."""

    def wrap(cls: type[ContinualMethod]) -> type[ContinualMethod]:
        cls.name = name
        METHOD_REGISTRY[name] = cls
        return cls

    return wrap


def build_method(config: ContinualConfig) -> ContinualMethod:
    """Instantiate the method named by ``config.continual_method``."""
    try:
        cls = METHOD_REGISTRY[config.continual_method]
    except KeyError:
        raise ValueError(
            f"continual_method={config.continual_method!r} has no implementation; "
            f"registered: {', '.join(sorted(METHOD_REGISTRY))}"
        ) from None
    return cls(config)


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


class ContinualMethod:
    """Plain sequential fine-tuning; the base class of every method (all hooks are no-ops)."""

    name = "none"

    def __init__(self, config: ContinualConfig) -> None:
        self.config = config
        self.tasks_seen: list[str] = []

    # ---- hooks -------------------------------------------------------------------------------------------
    def prepare_train_dataset(self, dataset: Any) -> Any:
        return dataset

    def on_task_begin(self, trainer: ContinualTrainer) -> None:
        return None

    def apply_gradients(self, model: torch.nn.Module) -> float | None:
        return None

    def after_optimizer_step(self, model: torch.nn.Module) -> None:
        return None

    def end_task(self, trainer: ContinualTrainer, train_dataset: Any, task_name: str) -> None:
        self.tasks_seen.append(task_name)

    # ---- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON metadata) describing everything needed to protect the tasks seen so far."""
        return {}, {"tasks_seen": list(self.tasks_seen)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.tasks_seen = list(meta.get("tasks_seen", []))


register_method("none")(ContinualMethod)


@register_method("joint")
class JointTraining(ContinualMethod):
    """Upper reference: each task trains on the union of all tasks' training data seen so far."""

    def __init__(self, config: ContinualConfig) -> None:
        super().__init__(config)
        self.past: list[Any] = []

    def prepare_train_dataset(self, dataset: Any) -> Any:
        return concat_datasets([*self.past, dataset])

    def end_task(self, trainer: ContinualTrainer, train_dataset: Any, task_name: str) -> None:
        super().end_task(trainer, train_dataset, task_name)
        self.past.append(train_dataset)


@register_method("replay")
class Replay(ContinualMethod):
    """Experience replay: a fixed budget (``replay_per_task``) of stored examples per past task is mixed in.

    The buffer is drawn uniformly with a seed derived from ``config.seed`` and the task index, so every process
    stores the same examples.
    """

    def __init__(self, config: ContinualConfig) -> None:
        super().__init__(config)
        self.buffers: list[Any] = []

    def prepare_train_dataset(self, dataset: Any) -> Any:
        return concat_datasets([*self.buffers, dataset])

    def end_task(self, trainer: ContinualTrainer, train_dataset: Any, task_name: str) -> None:
        super().end_task(trainer, train_dataset, task_name)
        rng = random.Random(self.config.seed * 1000 + len(self.buffers))
        n = min(self.config.replay_per_task, len(train_dataset))
        self.buffers.append(subset(train_dataset, sorted(rng.sample(range(len(train_dataset)), n))))


class PenaltyMethod(ContinualMethod):
    """Base for quadratic penalties ``sum_k lambda/2 (theta - a_k)^T F_k (theta - a_k)`` over stored terms.

    Each term is an anchor (parameter values at a task boundary) and a :class:`Curvature`. The gradient
    ``lambda * F_k (theta - a_k)`` is formed in closed form (``Curvature.matvec``), no autograd graph.
    """

    def __init__(self, config: ContinualConfig) -> None:
        super().__init__(config)
        self.terms: list[tuple[dict[str, torch.Tensor], Curvature]] = []

    # -- what subclasses choose --
    def estimate(self, trainer: ContinualTrainer, train_dataset: Any) -> Curvature:
        raise NotImplementedError

    def consolidate(self, anchor: dict[str, torch.Tensor], curvature: Curvature) -> None:
        """Default: a single consolidated term, F <- decay * F + F_t, anchor <- latest parameters."""
        if self.terms:
            _, old = self.terms[0]
            curvature = old.merge(curvature, decay=self.decay)
        self.terms = [(anchor, curvature)]

    decay = 1.0

    # -- hooks --
    def end_task(self, trainer: ContinualTrainer, train_dataset: Any, task_name: str) -> None:
        super().end_task(trainer, train_dataset, task_name)
        curvature = self.estimate(trainer, train_dataset)
        anchor = {n: p.detach().clone() for n, p in trainable_parameters(trainer.model).items()}
        self.consolidate(anchor, curvature)

    @torch.no_grad()
    def apply_gradients(self, model: torch.nn.Module) -> float | None:
        if not self.terms or self.config.continual_lambda == 0:
            return None
        lam = self.config.continual_lambda
        params = trainable_parameters(model)
        total = 0.0
        for anchor, curvature in self.terms:
            names = [n for n in curvature.param_names if n in params]
            delta = {n: params[n].detach() - anchor[n].to(params[n].device) for n in names}
            fdelta = curvature.matvec(delta)
            for n, g in fdelta.items():
                p = params[n]
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(g.to(p.grad.dtype), alpha=lam)
                total += float((delta[n] * g).sum())
        return 0.5 * lam * total

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        """The penalty value as a differentiable function of the parameters (reference for tests)."""
        params = trainable_parameters(model)
        total = torch.zeros(())
        for anchor, curvature in self.terms:
            delta = {n: params[n] - anchor[n] for n in curvature.param_names if n in params}
            total = total + curvature.quadratic(delta)
        return 0.5 * self.config.continual_lambda * total

    # -- state --
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().state_dict()
        meta["terms"] = []
        for k, (anchor, curvature) in enumerate(self.terms):
            for n, t in anchor.items():
                tensors[f"terms.{k}.anchor.{n}"] = t
            for n, t in curvature.state_dict().items():
                tensors[f"terms.{k}.curvature.{n}"] = t
            meta["terms"].append({"curvature": curvature.kind})
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        from .curvature.base import curvature_class

        super().load_state_dict(tensors, meta)
        self.terms = []
        for k, info in enumerate(meta.get("terms", [])):
            anchor_prefix, curv_prefix = f"terms.{k}.anchor.", f"terms.{k}.curvature."
            anchor = {n[len(anchor_prefix) :]: t for n, t in tensors.items() if n.startswith(anchor_prefix)}
            curv = {n[len(curv_prefix) :]: t for n, t in tensors.items() if n.startswith(curv_prefix)}
            self.terms.append((anchor, curvature_class(info["curvature"]).from_state_dict(curv)))


def _estimate(trainer: ContinualTrainer, dataset: Any, kind: str, **kwargs: Any) -> Curvature:
    """Fisher of the current model on a task's training data, as configured (type, samples, batch size)."""
    from .curvature import estimate_fisher

    cfg = trainer.args
    return estimate_fisher(
        trainer.model,
        dataset,
        kind=kind,
        fisher_type=cfg.fisher_type,
        num_samples=cfg.fisher_num_samples,
        mc_samples=cfg.fisher_mc_samples,
        batch_size=cfg.fisher_batch_size,
        data_collator=trainer.data_collator,
        show_progress=not cfg.disable_tqdm,
        **kwargs,
    )


@register_method("ewc")
class EWC(PenaltyMethod):
    """Elastic weight consolidation with the diagonal Fisher.

    ``ewc_mode="consolidated"`` (default) keeps one anchor (the parameters after the last task) and the sum of
    the tasks' Fishers: memory stays that of one Fisher whatever the number of tasks (what travels with a
    published model) and it is the recursive Laplace form (Huszar 2018). ``ewc_mode="per_task"`` is Kirkpatrick
    et al.'s original: one penalty per past task around that task's own anchor.
    """

    def estimate(self, trainer: ContinualTrainer, train_dataset: Any) -> Curvature:
        return _estimate(trainer, train_dataset, "diagonal")

    def consolidate(self, anchor: dict[str, torch.Tensor], curvature: Curvature) -> None:
        if self.config.ewc_mode == "per_task":
            self.terms.append((anchor, curvature))
        else:
            super().consolidate(anchor, curvature)


@register_method("online_ewc")
class OnlineEWC(EWC):
    """Online EWC (Schwarz et al. 2018): F <- gamma * F + F_t, anchor at the latest task boundary."""

    @property
    def decay(self) -> float:  # type: ignore[override]
        return self.config.online_ewc_gamma

    def consolidate(self, anchor: dict[str, torch.Tensor], curvature: Curvature) -> None:
        PenaltyMethod.consolidate(self, anchor, curvature)
