"""The one abstraction behind every protection method: a curvature (Fisher) representation.

Every penalty is ``lambda/2 * delta^T F delta`` with ``delta = theta - theta*``; only the structure of F
differs (diagonal, Kronecker-factored, ...). A representation knows how to compute ``delta^T F delta``
(``quadratic``) and ``F delta`` (``matvec``) for a dict of per-parameter tensors, how to accumulate across tasks
(``merge``) and how to serialise itself (``state_dict``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

Params = dict[str, torch.Tensor]


class Curvature(ABC):
    """A Fisher approximation over a set of named parameters."""

    #: short name written into saved state, e.g. "diagonal" or "kfac"; subclasses register under it
    kind: str = "abstract"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            if CURVATURE_KINDS.get(cls.kind, cls) is not cls:
                raise ValueError(
                    f"curvature kind {cls.kind!r} is already registered by {CURVATURE_KINDS[cls.kind]}"
                )
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

    def to(self, device: torch.device | str) -> Curvature:
        """This curvature with its floating tensors on ``device`` in at least fp32 (``self`` if already so).

        Called once when a state is loaded or training starts (never per step): every later product then
        runs where the parameters are, with no host-device copies. Generic through ``state_dict``.
        """
        device = torch.device(device)
        state = self.state_dict()

        def placed(t: torch.Tensor) -> bool:
            return not t.is_floating_point() or (
                t.device == device and t.dtype == torch.promote_types(t.dtype, torch.float32)
            )

        if all(placed(t) for t in state.values()):
            return self
        return type(self).from_state_dict(
            {
                k: t.to(device=device, dtype=torch.promote_types(t.dtype, torch.float32))
                if t.is_floating_point()
                else t
                for k, t in state.items()
            }
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors of ``state_dict()``."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def add_penalty_grad_(
        self, params: dict[str, torch.Tensor] | torch.nn.Module, anchors: dict[str, torch.Tensor], lam: float
    ) -> torch.Tensor:
        """Add ``lam * F (p - anchor)`` into ``p.grad`` of covered parameters; return ``lam/2 * quadratic``
        (a detached 0-dim fp32 tensor on the parameters' device: no host sync).

        This default is the generic kernel (:func:`curvature_penalty_grad_`, through :meth:`matvec`); each
        built-in representation overrides it with its own. Parameters without an anchor are left alone.
        """
        return curvature_penalty_grad_(self, params, anchors, lam)


@torch.no_grad()
def curvature_penalty_grad_(
    curvature: Curvature,
    params: Mapping[str, torch.Tensor] | torch.nn.Module,
    anchors: Mapping[str, torch.Tensor],
    lam: float,
) -> torch.Tensor:
    """The generic penalty kernel: ``p.grad += lam * F (p - p*)`` through one ``matvec``; returns
    ``lam/2 * <delta, F delta>`` (detached fp32 0-dim tensor, no host sync). Parameters without an anchor or not
    covered by ``curvature`` are left alone; a missing ``.grad`` becomes the penalty gradient."""
    named = dict(params.named_parameters()) if isinstance(params, torch.nn.Module) else dict(params)
    delta = {
        n: named[n].detach() - anchors[n].to(named[n].device)
        for n in curvature.param_names
        if n in named and n in anchors
    }
    total: torch.Tensor | None = None
    for n, v in curvature.matvec(delta).items():
        term = torch.dot(delta[n].reshape(-1).to(v.dtype), v.reshape(-1)).to(torch.float64)
        total = term if total is None else total + term.to(total.device)
        p = named[n]
        if p.grad is None:
            p.grad = (lam * v).to(p.dtype)
        else:
            p.grad.add_(v.to(p.grad.dtype), alpha=lam)
    if total is None:
        return torch.zeros(())
    return (0.5 * lam * total).to(torch.float32)


#: representation name (``Curvature.kind``, written into saved state) -> class; filled by ``__init_subclass__``
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
