"""Quadratic penalties ``lambda/2 (theta - theta*)^T F (theta - theta*)``: EWC, online EWC and K-FAC EWC.

The gradient ``lambda * F (theta - theta*)`` is added in closed form once per optimizer step
(:meth:`PenaltyMethod.apply_gradients`, through the curvature's own kernel), with no autograd graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..curvature.base import Curvature, curvature_class
from .base import ContinualMethod, MethodContext, fp32_copy, place_like, trainable_parameters
from .registry import register_method

if TYPE_CHECKING:
    from ..config import ContinualConfig

#: config fields every Fisher estimate reads
FISHER_FIELDS = (
    "continual_lambda",
    "fisher_type",
    "fisher_num_samples",
    "fisher_mc_samples",
    "fisher_batch_size",
)


class PenaltyMethod(ContinualMethod):
    """Base for quadratic penalties ``sum_k lambda/2 (theta - a_k)^T F_k (theta - a_k)`` over stored terms.

    Each term is an anchor (parameter values at a task boundary) and a :class:`Curvature`. The gradient
    ``lambda * F_k (theta - a_k)`` is formed in closed form (``Curvature.matvec``), no autograd graph.
    """

    def __init__(self, config: ContinualConfig) -> None:
        super().__init__(config)
        self.terms: list[tuple[dict[str, torch.Tensor], Curvature]] = []

    # -- what subclasses choose --
    needs_full_parameters = True
    config_fields = FISHER_FIELDS

    def estimate(self, ctx: MethodContext, train_dataset: Any) -> Curvature:
        raise NotImplementedError

    def consolidate(self, anchor: dict[str, torch.Tensor], curvature: Curvature) -> None:
        """Default: a single consolidated term, F <- decay * F + F_t, anchor <- latest parameters."""
        if self.terms:
            _, old = self.terms[0]
            curvature = old.merge(curvature, decay=self.decay)
        self.terms = [(anchor, curvature)]

    decay = 1.0

    # -- hooks --
    def end_task(self, ctx: MethodContext, train_dataset: Any, task_name: str) -> None:
        super().end_task(ctx, train_dataset, task_name)
        curvature = self.estimate(ctx, train_dataset)
        anchor = {n: fp32_copy(p) for n, p in trainable_parameters(ctx.model).items()}
        self.consolidate(anchor, curvature)

    @torch.no_grad()
    def apply_gradients(self, model: torch.nn.Module) -> torch.Tensor | None:
        """Add ``lambda * F_k (theta - a_k)`` of every term into ``.grad``; the penalty value, detached (a
        0-dim tensor on the parameters' device: reading it is left to logging time)."""
        if not self.terms or self.config.continual_lambda == 0:
            return None
        params = trainable_parameters(model)
        total = None
        for anchor, c in self.terms:
            v = c.add_penalty_grad_(params, anchor, self.config.continual_lambda)
            total = v if total is None else total + v.to(total.device)
        return total

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

    def load_state_dict(
        self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], model: torch.nn.Module | None = None
    ) -> None:
        super().load_state_dict(tensors, meta, model)
        self.terms = []
        for k, info in enumerate(meta.get("terms", [])):
            anchor_prefix, curv_prefix = f"terms.{k}.anchor.", f"terms.{k}.curvature."
            anchor = {n[len(anchor_prefix) :]: t for n, t in tensors.items() if n.startswith(anchor_prefix)}
            curv = {n[len(curv_prefix) :]: t for n, t in tensors.items() if n.startswith(curv_prefix)}
            self.terms.append((anchor, curvature_class(info["curvature"]).from_state_dict(curv)))
        if model is not None:
            self.place_(model)

    def place_(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        if not params or not self.terms:
            return
        device = next(iter(params.values())).device
        self.terms = [
            (
                {n: place_like(t, params[n]) if n in params else t.to(device) for n, t in anchor.items()},
                curvature.to(device),
            )
            for anchor, curvature in self.terms
        ]


def estimate_task_fisher(
    ctx: MethodContext, dataset: Any, kind: str, seed: int | None, **kwargs: Any
) -> Curvature:
    """Fisher of ``ctx.model`` on a task's training data, as configured (type, samples, batch size)."""
    from ..curvature import estimate_fisher

    cfg = ctx.config
    return estimate_fisher(
        ctx.model,
        dataset,
        kind=kind,
        fisher_type=cfg.fisher_type,
        num_samples=cfg.fisher_num_samples,
        mc_samples=cfg.fisher_mc_samples,
        batch_size=cfg.fisher_batch_size,
        data_collator=ctx.data_collator,
        show_progress=not cfg.disable_tqdm,
        seed=seed,
        process_group=ctx.process_group,
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

    config_fields = (*FISHER_FIELDS, "ewc_mode")

    def estimate(self, ctx: MethodContext, train_dataset: Any) -> Curvature:
        return estimate_task_fisher(ctx, train_dataset, "diagonal", self.config.seed + len(self.tasks_seen))

    def consolidate(self, anchor: dict[str, torch.Tensor], curvature: Curvature) -> None:
        if self.config.ewc_mode == "per_task":
            self.terms.append((anchor, curvature))
        else:
            super().consolidate(anchor, curvature)


@register_method("online_ewc")
class OnlineEWC(EWC):
    """Online EWC (Schwarz et al. 2018): F <- gamma * F + F_t, anchor at the latest task boundary."""

    config_fields = (*FISHER_FIELDS, "online_ewc_gamma")

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

    config_fields = (
        *FISHER_FIELDS,
        "kfac_mode",
        "kfac_damping",
        "kfac_cross_task",
        "kfac_compute_dtype",
        "kfac_rank",
    )

    def estimate(self, ctx: MethodContext, train_dataset: Any) -> Curvature:
        cfg = self.config
        fisher = estimate_task_fisher(
            ctx,
            train_dataset,
            "kfac",
            cfg.seed + len(self.tasks_seen),
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
