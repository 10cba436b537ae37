"""The one abstraction behind every protection method: a curvature (Fisher) representation.

Every penalty is ``lambda/2 * delta^T F delta`` with ``delta = theta - theta*``; only the structure of F
differs (diagonal, Kronecker-factored, ...). A representation knows how to compute ``delta^T F delta``
(``quadratic``) and ``F delta`` (``matvec``) for a dict of per-parameter tensors, how to accumulate across tasks
(``merge``) and how to serialise itself (``state_dict``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

Params = dict[str, torch.Tensor]


class Curvature(ABC):
    """A Fisher approximation over a set of named parameters."""

    #: short name written into saved state, e.g. "diagonal" or "kfac"; subclasses register under it
    kind: str = "abstract"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            CURVATURE_KINDS[cls.kind] = cls

    @property
    @abstractmethod
    def param_names(self) -> list[str]:
        """Names of the parameters this curvature covers (a subset of ``model.named_parameters()``)."""

    @abstractmethod
    def quadratic(self, delta: Params) -> torch.Tensor:
        """Return the scalar ``delta^T F delta`` summed over covered parameters (missing names count as zero)."""

    @abstractmethod
    def matvec(self, delta: Params) -> Params:
        """Return ``F delta`` as a dict with the same names/shapes as the covered entries of ``delta``."""

    @abstractmethod
    def merge(self, other: Curvature, decay: float = 1.0) -> Curvature:
        """Return ``decay * self + other`` (online accumulation across tasks) as a new object."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat dict of tensors (safetensors-compatible) that fully describes this curvature."""

    @classmethod
    @abstractmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> Curvature:
        """Inverse of ``state_dict``."""

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors of ``state_dict()``."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    @torch.no_grad()
    def add_penalty_grad_(
        self, params: dict[str, torch.Tensor] | torch.nn.Module, anchors: dict[str, torch.Tensor], lam: float
    ) -> float:
        """Add ``lam * F (p - anchor)`` into ``p.grad`` of covered parameters; return ``lam/2 * quadratic``.

        Generic version through :meth:`matvec` (no autograd graph); representations override it with a faster
        kernel. Parameters without an anchor are left alone.
        """
        named = dict(params.named_parameters()) if isinstance(params, torch.nn.Module) else params
        delta = {
            n: named[n].detach() - anchors[n].to(named[n].device)
            for n in self.param_names
            if n in named and n in anchors
        }
        total = 0.0
        for n, g in self.matvec(delta).items():
            p = named[n]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(g.to(p.grad.dtype), alpha=lam)
            total += float(torch.dot(delta[n].reshape(-1).float(), g.reshape(-1).float()))
        return 0.5 * lam * total

    def to(self, device: torch.device | str) -> Curvature:
        """Return a copy on ``device``."""
        return type(self).from_state_dict({k: v.to(device) for k, v in self.state_dict().items()})


CURVATURE_KINDS: dict[str, type[Curvature]] = {}


def curvature_class(kind: str) -> type[Curvature]:
    """The Curvature subclass saved under ``kind`` (imports the built-in representations on first use)."""
    import importlib

    for module in ("diagonal", "kfac"):
        try:
            importlib.import_module(f"hf_continual.curvature.{module}")
        except ImportError:  # pragma: no cover - both ship with the package
            pass
    try:
        return CURVATURE_KINDS[kind]
    except KeyError:
        raise ValueError(
            f"unknown curvature kind {kind!r}; known: {', '.join(sorted(CURVATURE_KINDS))}"
        ) from None
