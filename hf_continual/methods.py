"""Continual methods and their registry (method name -> implementation, PEFT-style).

A method plugs into :class:`~hf_continual.trainer.ContinualTrainer` at six points:

* ``prepare_train_dataset`` - what the Trainer trains on for the new task (replay / joint mix in old data);
* ``on_task_begin``         - before the first step of a task (e.g. FISH builds its mask);
* ``configure_optimizer``   - the task's fresh optimizer, before its LR schedule exists (FISH regroups it);
* ``apply_gradients``       - once per optimizer step, after gradient accumulation, all-reduce and clipping
  (the penalty gradient is not clipped), right before ``optimizer.step()``: adds the penalty gradient
  ``lambda * F delta`` in closed form and returns the penalty value for logging;
* ``after_optimizer_step``  - right after ``optimizer.step()`` (e.g. FISH restores frozen entries when the
  optimizer could not be regrouped);
* ``end_task``              - task boundary: consolidate (Fisher, factors, anchors, replay buffer).

``state_dict`` / ``load_state_dict`` make everything a method needs to protect old tasks travel with the model.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any

import torch

from .curvature.base import Curvature

if TYPE_CHECKING:
    from .config import ContinualConfig
    from .trainer import ContinualTrainer

logger = logging.getLogger(__name__)

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


def fp32_copy(p: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``p`` in at least fp32 (bf16/fp16 -> fp32, fp64 stays fp64), on ``p``'s device.

    Anchors and curvature are kept in fp32 whatever the model's dtype: the penalty is a small difference
    ``theta - theta*`` that bf16 (8 bits of mantissa) would round away.
    """
    return p.detach().to(dtype=torch.promote_types(p.dtype, torch.float32), copy=True)


class ContinualMethod:
    """Plain sequential fine-tuning; the base class of every method (all hooks are no-ops)."""

    name = "none"

    def __init__(self, config: ContinualConfig) -> None:
        self.config = config
        self.tasks_seen: list[str] = []

    # ---- hooks -------------------------------------------------------------------------------------------
    def prepare_train_dataset(self, dataset: Any) -> Any:
        return dataset

    def on_task_begin(self, trainer: ContinualTrainer, train_dataset: Any) -> None:
        return None

    def apply_gradients(self, model: torch.nn.Module) -> float | None:
        return None

    def configure_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Adjust a freshly created optimizer (before its LR scheduler exists); once per task."""

    def after_optimizer_step(self, model: torch.nn.Module) -> None:
        return None

    def end_task(self, trainer: ContinualTrainer, train_dataset: Any, task_name: str) -> None:
        self.tasks_seen.append(task_name)

    def restore_past_data(self, datasets: list[Any]) -> None:
        """Give back the training data of the tasks already seen (after loading state to resume a stream);
        only methods that keep data (replay, joint) use it."""
        return None

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

    def restore_past_data(self, datasets: list[Any]) -> None:
        self.past = list(datasets)


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
        self.buffers.append(self._buffer(train_dataset, len(self.buffers)))

    def _buffer(self, dataset: Any, task_index: int) -> Any:
        rng = random.Random(self.config.seed * 1000 + task_index)
        n = min(self.config.replay_per_task, len(dataset))
        return subset(dataset, sorted(rng.sample(range(len(dataset)), n)))

    def restore_past_data(self, datasets: list[Any]) -> None:
        self.buffers = [self._buffer(d, i) for i, d in enumerate(datasets)]


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
        anchor = {n: fp32_copy(p) for n, p in trainable_parameters(trainer.model).items()}
        self.consolidate(anchor, curvature)

    @torch.no_grad()
    def apply_gradients(self, model: torch.nn.Module) -> float | None:
        if not self.terms or self.config.continual_lambda == 0:
            return None
        params = trainable_parameters(model)
        return sum(
            c.add_penalty_grad_(params, anchor, self.config.continual_lambda) for anchor, c in self.terms
        )

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
        seed=cfg.seed + len(trainer.method.tasks_seen),
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


@register_method("kfac")
class KFACEWC(PenaltyMethod):
    """EWC with a Kronecker-factored Fisher for every ``nn.Linear`` (diagonal for the other parameters).

    The penalty gradient ``lambda * G dW A`` is two matmuls per layer. Across tasks the factors are merged
    (``kfac_cross_task="merged"``: G summed with decay, A a decayed mean; fixed memory) or kept per task (exact
    sum of Kronecker products); ``kfac_rank`` stores each factor as its top eigenpairs (compact state, cheaper
    penalty); ``kfac_compute_dtype="bfloat16"`` forms the per-batch products on bf16 matmul units.
    """

    def estimate(self, trainer: ContinualTrainer, train_dataset: Any) -> Curvature:
        cfg = self.config
        fisher = _estimate(
            trainer,
            train_dataset,
            "kfac",
            kfac_mode=cfg.kfac_mode,
            damping=cfg.kfac_damping,
            cross_task=cfg.kfac_cross_task,
            compute_dtype=getattr(torch, cfg.kfac_compute_dtype),
        )
        return fisher

    def consolidate(self, anchor: dict[str, torch.Tensor], curvature: Curvature) -> None:
        super().consolidate(anchor, curvature)
        if self.config.kfac_rank is not None:
            a, c = self.terms[0]
            self.terms = [(a, c.compress(rank=self.config.kfac_rank))]


@register_method("fish")
class Fish(ContinualMethod):
    """FISH masks: each task updates only the top ``fish_keep_ratio`` entries of its empirical Fisher.

    The mask is built at the start of a task from ``fish_num_samples`` examples of that task (the authors'
    defaults: 1024 examples, 0.5%, global top-k). ``fish_protect`` divides the new-task Fisher by the
    consolidated Fisher of earlier tasks; ``fish_penalty`` adds an EWC or K-FAC penalty on top (masked too).
    """

    def __init__(self, config: ContinualConfig) -> None:
        super().__init__(config)
        penalty_cls = {"ewc": EWC, "kfac": KFACEWC}.get(config.fish_penalty)
        self.penalty: PenaltyMethod | None = penalty_cls(config) if penalty_cls else None
        self.masks: dict[str, torch.Tensor] = {}
        self.old_fisher: Curvature | None = None
        self.updates = None
        self._params: dict[str, torch.nn.Parameter] | None = None
        self.mask_history: list[dict[str, Any]] = []

    def _fisher(self, trainer: ContinualTrainer, dataset: Any) -> Curvature:
        from .curvature import estimate_fisher

        cfg = self.config
        return estimate_fisher(
            trainer.model,
            dataset,
            kind="diagonal",
            fisher_type="empirical",
            num_samples=cfg.fish_num_samples,
            batch_size=cfg.fisher_batch_size,
            data_collator=trainer.data_collator,
            show_progress=not cfg.disable_tqdm,
        )

    def on_task_begin(self, trainer: ContinualTrainer, train_dataset: Any) -> None:
        from .masking import check_same_mask_across_ranks, fish_mask

        cfg = self.config
        fisher = self._fisher(trainer, train_dataset)
        old = self.old_fisher.diagonal() if (cfg.fish_protect and self.old_fisher is not None) else None
        self.masks = fish_mask(
            fisher.diagonal(), cfg.fish_keep_ratio, cfg.fish_scope, cfg.fish_trainable_modules, old
        )
        check_same_mask_across_ranks(self.masks)
        self._start_updates(trainable_parameters(trainer.model))

    def _start_updates(
        self, params: dict[str, torch.nn.Parameter], start: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Enforce ``self.masks`` on ``params`` from now on (``start``: frozen values when resuming a task)."""
        from .masking import MaskedUpdates

        if self.updates is not None:
            self.updates.detach()
        self._params = params
        self.updates = MaskedUpdates(params, self.masks)
        if start is not None:
            self.updates.start = {n: start[n].to(params[n].device) for n in self.updates.start}
        self.updates.attach()

    def configure_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if self.updates is not None:
            self.updates.configure_optimizer(optimizer)

    def apply_gradients(self, model: torch.nn.Module) -> float | None:
        value = None
        if self.penalty is not None:
            value = self.penalty.apply_gradients(model)
            if self.updates is not None:
                self.updates.mask_grads_()
        if self.updates is not None:
            self.updates.before_step_()
        return value

    def after_optimizer_step(self, model: torch.nn.Module) -> None:
        if self.updates is not None:
            self.updates.after_step_()

    def end_task(self, trainer: ContinualTrainer, train_dataset: Any, task_name: str) -> None:
        from .masking import mask_stats

        super().end_task(trainer, train_dataset, task_name)
        if self.updates is not None:
            drifted = self.updates.drifted()
            if drifted:
                logger.warning(
                    f"FISH: {drifted} frozen entries moved during task {task_name!r} (something wrote to the "
                    "weights outside the optimizer); they were put back to their start values"
                )
                self.updates.restore_()
            self.updates.detach()
            self.updates = None
        self.mask_history.append({"task": task_name, **mask_stats(self.masks)})
        if self.penalty is not None:
            self.penalty.end_task(trainer, train_dataset, task_name)
        if self.config.fish_protect:
            fisher = self._fisher(trainer, train_dataset)
            self.old_fisher = fisher if self.old_fisher is None else self.old_fisher.merge(fisher)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().state_dict()
        for n, m in self.masks.items():
            tensors[f"fish.mask.{n}"] = m.to(torch.uint8)
        if self.updates is not None:  # a task is in progress: its start values are needed to resume
            for n, t in self.updates.start.items():
                tensors[f"fish.start.{n}"] = t
        if self.old_fisher is not None:
            for n, t in self.old_fisher.state_dict().items():
                tensors[f"fish.old_fisher.{n}"] = t
        meta["mask_history"] = self.mask_history
        meta["task_in_progress"] = self.updates is not None
        if self.penalty is not None:
            p_tensors, p_meta = self.penalty.state_dict()
            tensors.update({f"penalty.{k}": v for k, v in p_tensors.items()})
            meta["penalty"] = p_meta
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        from .curvature.base import curvature_class

        super().load_state_dict(tensors, meta)

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.masks = {n: m.bool() for n, m in part("fish.mask.").items()}
        self.mask_history = list(meta.get("mask_history", []))
        old = part("fish.old_fisher.")
        self.old_fisher = curvature_class("diagonal").from_state_dict(old) if old else None
        if self.penalty is not None and "penalty" in meta:
            self.penalty.load_state_dict(part("penalty."), meta["penalty"])
        if meta.get("task_in_progress") and self._params is not None:
            self._start_updates(self._params, part("fish.start."))
