"""Diagonal Fisher: one non-negative tensor per parameter.

:class:`DiagonalFisher` is the representation (EWC, online EWC, FISH masks, and the non-Linear part of K-FAC).
:func:`add_penalty_grad_` is its penalty kernel, run once per optimizer step: ``p.grad += lam * F * (p - p*)``
with ``torch._foreach_*`` kernels and no autograd graph. Its estimator is
:class:`~hf_continual.curvature.collectors.diagonal.DiagonalCollector`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .base import Curvature, Params

# --------------------------------------------------------------------------------------------------------------
# representation
# --------------------------------------------------------------------------------------------------------------


class DiagonalFisher(Curvature):
    """Diagonal Fisher ``F = diag(f)``: ``f[name]`` has the shape of parameter ``name``.

    ``quadratic(delta) = sum f * delta^2``; ``matvec(delta) = f * delta``. Tensors are kept as given (float32 from
    the estimator) and cast to the parameter's dtype/device on the fly in :meth:`add_penalty_grad_`.
    """

    kind = "diagonal"

    def __init__(self, fisher: Mapping[str, torch.Tensor]) -> None:
        self.fisher: dict[str, torch.Tensor] = dict(fisher)

    # -- mapping helpers -------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self.fisher[name]

    def __contains__(self, name: object) -> bool:
        return name in self.fisher

    def __len__(self) -> int:
        return len(self.fisher)

    def __repr__(self) -> str:
        numel = sum(t.numel() for t in self.fisher.values())
        return f"DiagonalFisher({len(self.fisher)} tensors, {numel} entries)"

    # -- Curvature interface ---------------------------------------------------------------------------------
    @property
    def param_names(self) -> list[str]:
        return list(self.fisher)

    def quadratic(self, delta: Params) -> torch.Tensor:
        """``sum f * delta^2`` over names present in both (float32 scalar; differentiable in ``delta``)."""
        total: torch.Tensor | None = None
        for n, d in delta.items():
            if n not in self.fisher:
                continue
            f = self.fisher[n].to(device=d.device, dtype=d.dtype)
            term = torch.dot((f * d).reshape(-1), d.reshape(-1)).float()
            total = term if total is None else total + term
        return torch.zeros(()) if total is None else total

    def matvec(self, delta: Params) -> Params:
        """``f * delta`` for the covered entries of ``delta``."""
        return {
            n: self.fisher[n].to(device=d.device, dtype=d.dtype) * d
            for n, d in delta.items()
            if n in self.fisher
        }

    def merge(self, other: Curvature, decay: float = 1.0) -> DiagonalFisher:
        """``decay * self + other`` over the union of names (a name missing on one side counts as zero)."""
        if not isinstance(other, DiagonalFisher):
            raise TypeError(f"cannot merge a DiagonalFisher with {type(other).__name__}")
        out = {n: t * decay for n, t in self.fisher.items()}
        for n, t in other.fisher.items():
            out[n] = out[n] + t.to(out[n].device) if n in out else t.clone()
        return DiagonalFisher(out)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().contiguous() for n, t in self.fisher.items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> DiagonalFisher:
        return cls({n: t.clone() for n, t in state.items()})

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the tensors in place by those of ``state`` (inverse of ``state_dict``)."""
        self.fisher = {n: t.clone() for n, t in state.items()}

    # -- extras ----------------------------------------------------------------------------------------------
    def diagonal(self) -> dict[str, torch.Tensor]:
        """The per-parameter Fisher (used by FISH masks)."""
        return dict(self.fisher)

    def scale(self, c: float) -> DiagonalFisher:
        """``c * F`` as a new object."""
        return DiagonalFisher({n: t * c for n, t in self.fisher.items()})

    def add_penalty_grad_(
        self, params: Mapping[str, torch.Tensor] | nn.Module, anchors: Mapping[str, torch.Tensor], lam: float
    ) -> torch.Tensor:
        """Add ``lam * f * (p - anchor)`` into ``p.grad`` for covered ``params``; return ``lam/2 * quadratic``
        (detached tensor). Names are aligned here (cheap); the kernel is the module-level
        :func:`add_penalty_grad_`. Parameters without an anchor are left alone."""
        named = dict(params.named_parameters()) if isinstance(params, nn.Module) else params
        names = [n for n in named if n in self.fisher and n in anchors]
        ps = [named[n] for n in names]
        fs = [self.fisher[n].to(device=p.device, dtype=p.dtype) for n, p in zip(names, ps)]
        ans = [anchors[n].to(device=p.device, dtype=p.dtype) for n, p in zip(names, ps)]
        return add_penalty_grad_(ps, ans, fs, lam)


@torch.no_grad()
def add_penalty_grad_(
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    fisher: Sequence[torch.Tensor],
    lam: float,
) -> torch.Tensor:
    """In place ``p.grad += lam * F * (p - p*)`` for aligned lists; return ``lam/2 * sum F (p - p*)^2`` as a
    detached fp32 0-dim tensor on the parameters' device (no host sync: the caller reads it when it logs).

    Runs once per optimizer step (after gradient accumulation and all-reduce, before ``optimizer.step()``), with
    ``torch._foreach_*`` kernels and no autograd graph: cheaper than building the penalty through autograd.
    A parameter whose ``.grad`` is None gets the penalty gradient as its gradient. All three lists must share
    dtype and device per index.
    """
    if not params:
        return torch.zeros(())
    delta = torch._foreach_sub(list(params), list(anchors))
    fd = torch._foreach_mul(delta, list(fisher))
    value = torch.stack(
        [torch.dot(d.reshape(-1), f.reshape(-1)).float().to(delta[0].device) for d, f in zip(delta, fd)]
    ).sum()
    with_grad = [(p.grad, g) for p, g in zip(params, fd) if p.grad is not None]
    if with_grad:
        torch._foreach_add_([g for g, _ in with_grad], [f for _, f in with_grad], alpha=lam)
    for p, f in zip(params, fd):
        if p.grad is None:
            p.grad = f.mul_(lam)
    return value.mul_(0.5 * lam)
