"""K-FAC factor forms: a symmetric PSD matrix stored dense, or as top eigenpairs plus an isotropic residual.

``left(x)`` / ``right(x)`` multiply by the (optionally shifted) factor in either form, so a Kronecker block
``A (x) G`` acts on ``X`` as ``G X A`` without densifying a compressed factor; :func:`eig_compress` makes the
eigen form; :func:`damping_shifts` gives the factored Tikhonov damping of a pair.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


class DenseFactor:
    """A symmetric PSD factor stored as a dense matrix."""

    form = "dense"

    def __init__(self, mat: torch.Tensor) -> None:
        self.mat = mat
        self._trace: float | None = None

    @property
    def dim(self) -> int:
        return self.mat.shape[0]

    @property
    def device(self) -> torch.device:
        return self.mat.device

    def trace(self) -> float:
        """Cached (factors are never changed in place): the damping shifts of every step read no device."""
        if self._trace is None:
            self._trace = float(self.mat.diagonal().sum(dtype=torch.float64))
        return self._trace

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.mat.to(dtype)

    def left(self, x: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        """``(F + shift I) @ x``."""
        y = self.mat.to(x.dtype) @ x
        return y.add_(x, alpha=shift) if shift else y

    def right(self, x: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        """``x @ (F + shift I)``."""
        y = x @ self.mat.to(x.dtype)
        return y.add_(x, alpha=shift) if shift else y

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mat": self.mat}

    @property
    def nbytes(self) -> int:
        return self.mat.numel() * self.mat.element_size()


def _row_major_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


class EigFactor:
    """``F ~ Q diag(lam) Q^T + rho (I - Q Q^T)``: top-k eigenpairs plus an isotropic residual ``rho``."""

    form = "eig"

    def __init__(self, q: torch.Tensor, lam: torch.Tensor, rho: torch.Tensor) -> None:
        # canonical row-major strides: a rank-1 ``q`` sliced from ``eigh``'s column-major output is "contiguous"
        # with strides (1, d), while the same tensor read back from a checkpoint has (1, 1); BLAS then takes
        # another kernel and the penalty of a reloaded state would differ in the last bits
        self.q = (
            q if q.stride() == _row_major_strides(q.shape) else q.clone(memory_format=torch.contiguous_format)
        )
        self.lam, self.rho = lam, rho
        #: ``rho`` as a Python float, read once here rather than from the device at every penalty step
        self.rho_value = float(rho)
        self._trace: float | None = None

    @property
    def dim(self) -> int:
        return self.q.shape[0]

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def rank(self) -> int:
        return self.q.shape[1]

    def trace(self) -> float:
        if self._trace is None:
            self._trace = float(self.lam.sum(dtype=torch.float64)) + self.rho_value * (self.dim - self.rank)
        return self._trace

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self.q.to(dtype)
        rho = self.rho_value
        out = (q * (self.lam.to(dtype) - rho)) @ q.T
        if rho:
            out.diagonal().add_(rho)
        return out

    def left(self, x: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        q = self.q.to(x.dtype)
        rho = self.rho_value
        y = q @ ((self.lam.to(x.dtype) - rho)[:, None] * (q.T @ x))
        return y.add_(x, alpha=rho + shift) if rho + shift else y

    def right(self, x: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        q = self.q.to(x.dtype)
        rho = self.rho_value
        y = ((x @ q) * (self.lam.to(x.dtype) - rho)) @ q.T
        return y.add_(x, alpha=rho + shift) if rho + shift else y

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"q": self.q, "lam": self.lam, "rho": self.rho}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


Factor = DenseFactor | EigFactor


def factor_from_tensors(form: str, t: Mapping[str, torch.Tensor]) -> Factor:
    """A factor from saved tensors, each copied into its own allocation: tensors read from a safetensors file can
    be views at any offset of one buffer, and BLAS picks its kernels by alignment, so the reloaded penalty would
    differ from the saved one in the last bits."""
    t = {k: v.clone() for k, v in t.items()}
    if form == "dense":
        return DenseFactor(t["mat"])
    if form == "eig":
        return EigFactor(t["q"], t["lam"], t["rho"])
    raise ValueError(f"unknown factor form {form!r}")


def eig_compress(
    mat: torch.Tensor,
    rank: int | None = None,
    energy: float | None = 0.999,
    dtype: torch.dtype = torch.float32,
    residual: bool = True,
) -> EigFactor:
    """Eigen-truncate a symmetric PSD matrix: keep the top ``k`` eigenpairs.

    ``k`` is the smallest count whose eigenvalues hold ``energy`` of the trace, capped by ``rank``
    (``rank=None`` and ``energy=None``: keep all). With ``residual`` the discarded eigenvalues are replaced by
    their mean (an isotropic term that keeps the trace). ``Q`` is stored in ``dtype``; eigenvalues in fp32.
    """
    m = mat.to(torch.float64)
    lam, q = torch.linalg.eigh((m + m.T) / 2)
    lam, q = lam.flip(0).clamp_min(0.0), q.flip(1)
    d = lam.numel()
    k = d
    total = float(lam.sum())
    if energy is not None and energy < 1.0 and total > 0:
        cum = torch.cumsum(lam, 0)
        k = int(torch.searchsorted(cum, torch.tensor(energy * total, dtype=cum.dtype)).item()) + 1
    if rank is not None:
        k = min(k, rank)
    k = max(1, min(k, d))
    rho = float(lam[k:].mean()) if (residual and k < d) else 0.0
    return EigFactor(
        q[:, :k].to(dtype).contiguous(),
        lam[:k].to(torch.float32).contiguous(),
        torch.tensor(rho, dtype=torch.float32),
    )


def damping_shifts(A: Factor, G: Factor, gamma: float) -> tuple[float, float]:
    """Factored Tikhonov shifts ``(pi sqrt(gamma), sqrt(gamma) / pi)``, ``pi = sqrt((trA/dA) / (trG/dG))``."""
    if gamma <= 0:
        return 0.0, 0.0
    ta, tg = A.trace() / A.dim, G.trace() / G.dim
    pi = math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0
    return pi * math.sqrt(gamma), math.sqrt(gamma) / pi
