"""FISH masks (Sung et al. 2021): each task updates only the top entries of its empirical Fisher."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from ..curvature.base import Curvature, curvature_class
from .base import ContinualMethod, MethodContext, trainable_parameters
from .penalty import EWC, KFACEWC, PenaltyMethod
from .registry import register_method

if TYPE_CHECKING:
    from ..config import ContinualConfig

logger = logging.getLogger(__name__)

FISH_FIELDS = (
    "fish_keep_ratio",
    "fish_num_samples",
    "fish_scope",
    "fish_trainable_modules",
    "fish_protect",
    "fish_penalty",
    "fisher_batch_size",
)


@register_method("fish")
class Fish(ContinualMethod):
    """FISH masks: each task updates only the top ``fish_keep_ratio`` entries of its empirical Fisher.

    The mask is built at the start of a task from ``fish_num_samples`` examples of that task (the authors'
    defaults: 1024 examples, 0.5%, global top-k). ``fish_protect`` divides the new-task Fisher by the
    consolidated Fisher of earlier tasks; ``fish_penalty`` adds an EWC or K-FAC penalty on top (masked too).
    """

    needs_full_parameters = True
    plain_first_task = False  # the first task trains under its own mask
    config_fields = FISH_FIELDS

    @classmethod
    def used_fields(cls, config: ContinualConfig) -> set[str]:
        """FISH's own fields, plus those of the penalty it is combined with (``fish_penalty``)."""
        extra = {"ewc": EWC, "kfac": KFACEWC}.get(config.fish_penalty)
        return super().used_fields(config) | (extra.used_fields(config) if extra else set())

    def __init__(self, config: ContinualConfig) -> None:
        super().__init__(config)
        penalty_cls = {"ewc": EWC, "kfac": KFACEWC}.get(config.fish_penalty)
        self.penalty: PenaltyMethod | None = penalty_cls(config) if penalty_cls else None
        self.masks: dict[str, torch.Tensor] = {}
        self.old_fisher: Curvature | None = None
        self.updates = None
        self._params: dict[str, torch.nn.Parameter] | None = None
        self.mask_history: list[dict[str, Any]] = []

    @property
    def task_in_progress(self) -> bool:
        return self.updates is not None

    def _fisher(self, ctx: MethodContext, dataset: Any) -> Curvature:
        from ..curvature import estimate_fisher

        cfg = self.config
        return estimate_fisher(
            ctx.model,
            dataset,
            kind="diagonal",
            fisher_type="empirical",
            num_samples=cfg.fish_num_samples,
            batch_size=cfg.fisher_batch_size,
            data_collator=ctx.data_collator,
            show_progress=not cfg.disable_tqdm,
            process_group=ctx.process_group,
        )

    def begin_task(self, ctx: MethodContext, train_dataset: Any) -> None:
        from ..masking import check_same_mask_across_ranks, fish_mask

        cfg = self.config
        fisher = self._fisher(ctx, train_dataset)
        old = self.old_fisher.diagonal() if (cfg.fish_protect and self.old_fisher is not None) else None
        self.masks = fish_mask(
            fisher.diagonal(), cfg.fish_keep_ratio, cfg.fish_scope, cfg.fish_trainable_modules, old
        )
        check_same_mask_across_ranks(self.masks)
        self._start_updates(trainable_parameters(ctx.model))

    def _start_updates(
        self, params: dict[str, torch.nn.Parameter], start: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Enforce ``self.masks`` on ``params`` from now on (``start``: frozen values when resuming a task)."""
        from ..masking import MaskedUpdates

        if self.updates is not None:
            self.updates.detach()
        self._params = params
        self.updates = MaskedUpdates(params, self.masks)
        if start is not None:
            self.updates.start = {n: start[n].to(params[n]) for n in self.updates.start}  # device and dtype
        self.updates.attach()

    def configure_optimizer(self, optimizer: torch.optim.Optimizer) -> bool:
        """Regroup a fresh AdamW so it keeps frozen entries still by itself (else: a restore after each step)."""
        if self.updates is not None:
            return self.updates.configure_optimizer(optimizer)
        return False

    def apply_gradients(self, model: torch.nn.Module) -> torch.Tensor | None:
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

    def end_task(self, ctx: MethodContext, train_dataset: Any, task_name: str) -> None:
        from ..masking import mask_stats

        super().end_task(ctx, train_dataset, task_name)
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
            self.penalty.end_task(ctx, train_dataset, task_name)
        if self.config.fish_protect:
            fisher = self._fisher(ctx, train_dataset)
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

    def load_state_dict(
        self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], model: torch.nn.Module | None = None
    ) -> None:
        super().load_state_dict(tensors, meta, model)

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.masks = {n: m.bool() for n, m in part("fish.mask.").items()}
        self.mask_history = list(meta.get("mask_history", []))
        old = part("fish.old_fisher.")
        self.old_fisher = curvature_class("diagonal").from_state_dict(old) if old else None
        if self.penalty is not None and "penalty" in meta:
            self.penalty.load_state_dict(part("penalty."), meta["penalty"], model)
        if model is not None:
            self.place_(model)
        params = trainable_parameters(model) if model is not None else self._params
        if meta.get("task_in_progress") and params is not None:
            self._start_updates(params, part("fish.start."))

    def place_(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        if not params:
            return
        device = next(iter(params.values())).device
        self.masks = {n: m.to(params[n].device if n in params else device) for n, m in self.masks.items()}
        if self.old_fisher is not None:
            self.old_fisher = self.old_fisher.to(device)
        if self.penalty is not None:
            self.penalty.place_(model)
