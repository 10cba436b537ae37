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

    #: short name written into saved state, e.g. "diagonal" or "kfac"
    kind: str = "abstract"

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

    def to(self, device: torch.device | str) -> Curvature:
        """Return a copy on ``device``."""
        return type(self).from_state_dict({k: v.to(device) for k, v in self.state_dict().items()})
