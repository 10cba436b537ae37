"""Kronecker-factored (K-FAC) Fisher for every ``nn.Linear`` plus a diagonal Fisher for the rest.

For a Linear layer ``s = W a + b`` the Fisher block of ``W_bar = [W | b]`` is approximated by ``A (x) G`` with
``A = E[a_bar a_bar^T]`` (``a_bar = [a; 1]`` when the layer has a bias) and ``G = E[g g^T]`` (``g`` = gradient of
one example's loss w.r.t. the layer output). With ``X = dW_bar`` (shape ``[out, in(+1)]``) and the column-major
``vec``: ``vec(X)^T (A (x) G) vec(X) = tr(G X A X^T)`` and ``(A (x) G) vec(X) = vec(G X A)`` -- two matmuls.

Sequences (Eschenhagen et al., NeurIPS 2023), padding masked with the attention mask:

- ``expand``: every non-padding token is an example for A (mean of ``a a^T`` over tokens) and
  ``G = (1/N) sum_n sum_t g_nt g_nt^T``.
- ``reduce``: per example, ``a_n`` = mean of ``a`` over its tokens, ``g_n`` = sum of ``g`` over its tokens;
  ``A = mean_n a_n a_n^T``, ``G = mean_n g_n g_n^T``. Cheaper (outer products of ``[N, d]`` instead of
  ``[N * T, d]``) and measured closer to the exact block for per-sequence losses (see bench/bench_kfac.py).

Across tasks a sum of Kronecker products is not one Kronecker product: ``cross_task="per_task"`` keeps one
``(A_t, G_t)`` term per task (exact, memory grows), ``"merged"`` keeps one pair (fixed memory, approximate).

Forms: ``dense`` factors, or the ``compress``-ed eigen form ``F ~ Q diag(lam) Q^T + rho (I - Q Q^T)`` (top-k
eigenpairs plus the mean of the discarded eigenvalues as an isotropic term, so the trace is kept), optionally
stored in bfloat16. ``quadratic``/``matvec`` work directly in either form.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ._hooks import LayerCapture, Record
from .base import Curvature, Params, curvature_class

KFACMode = Literal["expand", "reduce"]
CrossTask = Literal["merged", "per_task"]

_META_KEY = "kfac.__meta__"
#: ``diagonal_class`` values written by earlier versions -> curvature kind (old state files still load)
_LEGACY_DIAGONAL_CLASSES = {"hf_continual.curvature.diagonal:DiagonalFisher": "diagonal"}
#: default sequence convention (see the module docstring and bench/bench_kfac.py for the measurement)
DEFAULT_MODE: KFACMode = "reduce"
#: reduce-mode rows buffered per factor sum before one stacked outer product (KFACCollector._add_rows_)
PENDING_ROWS = 256
#: per-layer overrides applied under ``reduce`` unless ``layer_modes`` is given: the attention key projection of
#: BERT-style models gets ``expand`` (under ``reduce`` its G vanishes: see KFACCollector)
DEFAULT_LAYER_MODES: dict[str, KFACMode] = {r"attention\.self\.key$": "expand"}


# ----------------------------------------------------------------------------------------------------------
# Factors: dense or eigen (low-rank + isotropic residual)
# ----------------------------------------------------------------------------------------------------------


class DenseFactor:
    """A symmetric PSD factor stored as a dense matrix."""

    form = "dense"

    def __init__(self, mat: torch.Tensor) -> None:
        self.mat = mat
        self._trace: float | None = None

    @property
    def dim(self) -> int:
        return self.mat.shape[0]

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


def _factor_from_tensors(form: str, t: Mapping[str, torch.Tensor]) -> Factor:
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


# ----------------------------------------------------------------------------------------------------------
# The curvature object
# ----------------------------------------------------------------------------------------------------------


@dataclass
class KronTerm:
    """One Kronecker product ``scale * A (x) G``."""

    A: Factor
    G: Factor
    scale: float = 1.0


@dataclass
class KFACLayer:
    """Factors of one Linear module; ``bias`` is ``None`` when the layer has no (trainable) bias."""

    module: str
    weight: str
    bias: str | None
    terms: list[KronTerm] = field(default_factory=list)


def damping_shifts(A: Factor, G: Factor, gamma: float) -> tuple[float, float]:
    """Factored Tikhonov shifts ``(pi sqrt(gamma), sqrt(gamma) / pi)``, ``pi = sqrt((trA/dA) / (trG/dG))``."""
    if gamma <= 0:
        return 0.0, 0.0
    ta, tg = A.trace() / A.dim, G.trace() / G.dim
    pi = math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0
    return pi * math.sqrt(gamma), math.sqrt(gamma) / pi


class KFACFisher(Curvature):
    """K-FAC blocks for Linear layers plus an optional diagonal curvature for every other parameter.

    Args:
        layers: one :class:`KFACLayer` per Linear module.
        diagonal: curvature (e.g. ``DiagonalFisher``) for the parameters outside Linear layers, or ``None``.
        damping: ``gamma`` of the factored Tikhonov damping ``(A + pi sqrt(gamma) I) (x) (G + sqrt(gamma)/pi I)``.
            Default 0: the penalty uses F directly (it is never inverted), so nothing needs stabilising and
            ``gamma > 0`` would add an isotropic pull towards the anchor that is not curvature.
        cross_task: ``"merged"`` or ``"per_task"`` (see :meth:`merge`).
        mode: ``"expand"`` / ``"reduce"`` (metadata only).
    """

    kind = "kfac"

    def __init__(
        self,
        layers: list[KFACLayer],
        diagonal: Curvature | None = None,
        damping: float = 0.0,
        cross_task: CrossTask = "merged",
        mode: str | None = None,
        task_weight: float = 1.0,
    ) -> None:
        if cross_task not in ("merged", "per_task"):
            raise ValueError(f"cross_task must be 'merged' or 'per_task', got {cross_task!r}")
        self.layers = layers
        self.diagonal = diagonal
        self.damping = float(damping)
        self.cross_task: CrossTask = cross_task
        self.mode = mode
        #: decayed number of tasks merged so far (used by the merged mode to average A)
        self.task_weight = float(task_weight)
        #: filled by :meth:`compress`
        self.compression_report: dict[str, Any] | None = None

    # --- coverage -------------------------------------------------------------------------------------------
    @property
    def param_names(self) -> list[str]:
        names = []
        for layer in self.layers:
            names.append(layer.weight)
            if layer.bias is not None:
                names.append(layer.bias)
        if self.diagonal is not None:
            names.extend(self.diagonal.param_names)
        return names

    def layer(self, module: str) -> KFACLayer:
        for layer in self.layers:
            if layer.module == module:
                return layer
        raise KeyError(module)

    def factors(self, module: str, term: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``(A, G)`` of one module (without damping)."""
        t = self.layer(module).terms[term]
        return t.A.to_dense(), t.G.to_dense()

    @property
    def factor_nbytes(self) -> int:
        """Bytes of the Kronecker factors only (no diagonal part, no metadata)."""
        return sum(t.A.nbytes + t.G.nbytes for layer in self.layers for t in layer.terms)

    # --- core algebra ---------------------------------------------------------------------------------------
    @staticmethod
    def _stack(layer: KFACLayer, delta: Params) -> torch.Tensor | None:
        w = delta.get(layer.weight)
        b = delta.get(layer.bias) if layer.bias is not None else None
        if w is None and b is None:
            return None
        if w is None:
            t0 = layer.terms[0]
            w = b.new_zeros(t0.G.dim, t0.A.dim - 1)  # type: ignore[union-attr]
        if layer.bias is None:
            return w
        if b is None:
            b = w.new_zeros(w.shape[0])
        return torch.cat([w, b[:, None].to(w.dtype)], dim=1)

    def _layer_matvec(self, layer: KFACLayer, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor | None = None
        for t in layer.terms:
            sa, sg = damping_shifts(t.A, t.G, self.damping)
            y = t.G.left(t.A.right(x, sa), sg)
            if t.scale != 1.0:
                y.mul_(t.scale)
            out = y if out is None else out.add_(y)
        assert out is not None
        return out

    def matvec(self, delta: Params) -> Params:
        """``F delta``: ``G dW_bar A`` per Linear layer (split into weight/bias) plus the diagonal part."""
        out: Params = {}
        with torch.no_grad():
            for layer in self.layers:
                x = self._stack(layer, delta)
                if x is None:
                    continue
                y = self._layer_matvec(layer, x.to(torch.float32))
                if layer.weight in delta:
                    w = delta[layer.weight]
                    out[layer.weight] = (y[:, : w.shape[1]] if layer.bias is not None else y).to(w.dtype)
                if layer.bias is not None and layer.bias in delta:
                    out[layer.bias] = y[:, -1].to(delta[layer.bias].dtype).contiguous()
            if self.diagonal is not None:
                out.update(self.diagonal.matvec(delta))
        return out

    def quadratic(self, delta: Params) -> torch.Tensor:
        """``delta^T F delta`` = sum over layers of ``tr(G X A X^T)`` plus the diagonal part.

        Differentiable in ``delta`` (the reference the closed-form penalty gradient is tested against);
        accumulated in float64, returned as float32.
        """
        total: torch.Tensor | None = None
        for layer in self.layers:
            x = self._stack(layer, delta)
            if x is None:
                continue
            x = x.to(torch.float32)
            for t in layer.terms:
                q = t.scale * self._term_quadratic(t, x)
                total = q if total is None else total + q.to(total.device)
        if self.diagonal is not None:
            d = self.diagonal.quadratic(delta).to(torch.float64)
            total = d if total is None else total + d.to(total.device)
        if total is None:
            return torch.zeros(())
        return total.to(torch.float32)

    def _term_quadratic(self, t: KronTerm, x: torch.Tensor) -> torch.Tensor:
        sa, sg = damping_shifts(t.A, t.G, self.damping)
        if isinstance(t.A, EigFactor) and isinstance(t.G, EigFactor):
            # in the eigenbases: F = Q D Q^T + r I with D = lam - rho, r = rho + shift
            qa, qg = t.A.q.to(x.dtype), t.G.q.to(x.dtype)
            ra, rg = t.A.rho_value + sa, t.G.rho_value + sg
            da, dg = t.A.lam.to(x.dtype) + sa - ra, t.G.lam.to(x.dtype) + sg - rg
            y = x @ qa  # [out, kA]
            c = qg.T @ y  # [kG, kA]
            val = (dg[:, None] * c.square() * da[None, :]).sum(dtype=torch.float64)
            if rg:
                val += rg * (y.square() * da).sum(dtype=torch.float64)
            if ra:
                z = qg.T @ x  # [kG, in]
                val += ra * (dg[:, None] * z.square()).sum(dtype=torch.float64)
            if ra and rg:
                val += ra * rg * x.square().sum(dtype=torch.float64)
            return val
        gx = t.G.left(x, sg)
        xa = t.A.right(x, sa)
        return (gx * xa).sum(dtype=torch.float64)

    # --- penalty kernel -------------------------------------------------------------------------------------
    @torch.no_grad()
    def add_penalty_grad_(
        self,
        params: Mapping[str, torch.Tensor] | nn.Module,
        anchors: Mapping[str, torch.Tensor],
        lam: float,
    ) -> torch.Tensor:
        """Add ``lam * F (p - p*)`` into ``p.grad`` in place; return ``lam/2 * delta^T F delta`` (detached fp32
        0-dim tensor on the parameters' device, no host sync).

        Per Linear layer one closed-form product (:func:`_eig_layer_penalty_grad_` for low-rank eigen factors,
        else :func:`_layer_penalty_grad_`), the value as ``<delta, F delta>`` (no work done twice); the diagonal
        part through its own kernel (``DiagonalFisher``: ``torch._foreach_*``).
        """
        named = dict(params.named_parameters()) if isinstance(params, nn.Module) else dict(params)
        total: torch.Tensor | None = None

        def add(v: torch.Tensor) -> None:
            nonlocal total
            total = v if total is None else total + v.to(total.device)

        for layer in self.layers:
            if layer.weight not in named or layer.weight not in anchors:
                continue
            if _low_rank_eig(layer):
                add(_eig_layer_penalty_grad_(layer, named, anchors, lam, self.damping))
            else:
                add(_layer_penalty_grad_(self, layer, named, anchors, lam))
        if self.diagonal is not None:
            add(self.diagonal.add_penalty_grad_(named, anchors, lam))
        return torch.zeros(()) if total is None else total

    # --- across tasks ---------------------------------------------------------------------------------------
    def merge(self, other: Curvature, decay: float = 1.0) -> KFACFisher:
        """Return ``decay * self + other``.

        ``per_task`` (exact): the terms of ``self`` are kept with their scales multiplied by ``decay`` and the
        terms of ``other`` appended. ``merged`` (approximate, fixed memory): one pair per layer with
        ``G <- decay * G + G_t`` and ``A <- (decay * c * A + A_t) / (decay * c + 1)`` where ``c`` is the decayed
        task count, i.e. A is the decay-weighted mean of the task A's so that ``A (x) G`` has the scale of the
        exact sum (the literal ``A <- decay A + A_t`` over-counts: two identical tasks would give 4x instead of
        2x). Equal for identical tasks; compressed factors are densified first.
        """
        if not isinstance(other, KFACFisher):
            raise TypeError(f"cannot merge {type(other).__name__} into KFACFisher")
        mods = {layer.module: layer for layer in other.layers}
        if set(mods) != {layer.module for layer in self.layers}:
            raise ValueError("KFACFisher.merge: the two curvatures cover different Linear layers")
        new_layers: list[KFACLayer] = []
        c = self.task_weight
        for layer in self.layers:
            o = mods[layer.module]
            if self.cross_task == "per_task":
                terms = [KronTerm(t.A, t.G, t.scale * decay) for t in layer.terms]
                terms += [KronTerm(t.A, t.G, t.scale) for t in o.terms]
            else:
                a_old, g_old = _collapse(layer.terms)
                a_new, g_new = _collapse(o.terms)
                w = decay * c
                a = (a_old * w + a_new * other.task_weight) / (w + other.task_weight)
                g = g_old * decay + g_new
                terms = [KronTerm(DenseFactor(a), DenseFactor(g))]
            new_layers.append(KFACLayer(layer.module, layer.weight, layer.bias, terms))
        diag = None
        if self.diagonal is not None and other.diagonal is not None:
            diag = self.diagonal.merge(other.diagonal, decay)
        elif self.diagonal is not None or other.diagonal is not None:
            raise ValueError("KFACFisher.merge: only one side has a diagonal part")
        return KFACFisher(
            new_layers,
            diag,
            damping=self.damping,
            cross_task=self.cross_task,
            mode=self.mode,
            task_weight=decay * c + other.task_weight,
        )

    # --- compact form ---------------------------------------------------------------------------------------
    def compress(
        self,
        rank: int | None = None,
        energy: float | None = 0.999,
        dtype: torch.dtype = torch.float32,
        residual: bool = True,
        num_deltas: int = 4,
        seed: int = 0,
    ) -> KFACFisher:
        """Eigen-truncated copy (see :func:`eig_compress`); the diagonal part is shared unchanged.

        The returned object's ``compression_report`` holds the relative Frobenius error of every factor (max and
        mean) and the relative error of ``quadratic`` on ``num_deltas`` random Gaussian deltas (K-FAC part only).
        """
        layers = []
        frob = []
        for layer in self.layers:
            terms = []
            for t in layer.terms:
                fa, fg = t.A.to_dense(), t.G.to_dense()
                ca = eig_compress(fa, rank, energy, dtype, residual)
                cg = eig_compress(fg, rank, energy, dtype, residual)
                for f, cf in ((fa, ca), (fg, cg)):
                    n = float(torch.linalg.matrix_norm(f))
                    frob.append(float(torch.linalg.matrix_norm(f - cf.to_dense())) / n if n > 0 else 0.0)
                terms.append(KronTerm(ca, cg, t.scale))
            layers.append(KFACLayer(layer.module, layer.weight, layer.bias, terms))
        out = KFACFisher(layers, self.diagonal, self.damping, self.cross_task, self.mode, self.task_weight)
        errs = self.kfac_relative_error(out, num_deltas=num_deltas, seed=seed)
        out.compression_report = {
            "rank": rank,
            "energy": energy,
            "dtype": str(dtype).replace("torch.", ""),
            "residual": residual,
            "factor_rel_frob_max": max(frob) if frob else 0.0,
            "factor_rel_frob_mean": sum(frob) / len(frob) if frob else 0.0,
            "quadratic_rel_err_max": max(errs) if errs else 0.0,
            "quadratic_rel_err_mean": sum(errs) / len(errs) if errs else 0.0,
            "factor_nbytes": out.factor_nbytes,
            "factor_nbytes_before": self.factor_nbytes,
        }
        return out

    def kfac_relative_error(self, approx: KFACFisher, num_deltas: int = 4, seed: int = 0) -> list[float]:
        """``|q_approx - q| / q`` of the K-FAC quadratic (diagonal part excluded) on random Gaussian deltas."""
        gen = torch.Generator().manual_seed(seed)
        errs = []
        ref_k = KFACFisher(self.layers, None, self.damping, self.cross_task)
        app_k = KFACFisher(approx.layers, None, approx.damping, approx.cross_task)
        for _ in range(num_deltas):
            delta = {}
            for layer in self.layers:
                t = layer.terms[0]
                din = t.A.dim - (1 if layer.bias is not None else 0)
                delta[layer.weight] = torch.randn(t.G.dim, din, generator=gen)
                if layer.bias is not None:
                    delta[layer.bias] = torch.randn(t.G.dim, generator=gen)
            q = float(ref_k.quadratic(delta))
            errs.append(abs(float(app_k.quadratic(delta)) - q) / q if q > 0 else 0.0)
        return errs

    # --- serialisation --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat dict: ``kfac.{layer}.{term}.{A|G}.{mat|q|lam|rho}`` + diagonal under ``diag.`` + a JSON
        metadata tensor (uint8) under ``kfac.__meta__``. Contiguous tensors, no shared storage."""
        out: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {
            "version": 1,
            "damping": self.damping,
            "cross_task": self.cross_task,
            "mode": self.mode,
            "task_weight": self.task_weight,
            "layers": [],
        }
        for i, layer in enumerate(self.layers):
            lm = {"module": layer.module, "weight": layer.weight, "bias": layer.bias, "terms": []}
            for j, t in enumerate(layer.terms):
                lm["terms"].append({"A": t.A.form, "G": t.G.form, "scale": t.scale})
                for side, f in (("A", t.A), ("G", t.G)):
                    for k, v in f.tensors().items():
                        out[f"kfac.{i}.{j}.{side}.{k}"] = v
            meta["layers"].append(lm)
        if self.diagonal is not None:
            meta["diagonal_kind"] = self.diagonal.kind
            for k, v in self.diagonal.state_dict().items():
                out[f"diag.{k}"] = v
        seen: set[int] = set()
        for k, v in out.items():
            v = v.detach().contiguous()
            ptr = v.untyped_storage().data_ptr()
            if ptr in seen or v.untyped_storage().nbytes() != v.numel() * v.element_size():
                v = v.clone()
            seen.add(v.untyped_storage().data_ptr())
            out[k] = v
        out[_META_KEY] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> KFACFisher:
        meta = json.loads(bytes(state[_META_KEY].tolist()).decode())
        layers = []
        for i, lm in enumerate(meta["layers"]):
            terms = []
            for j, tm in enumerate(lm["terms"]):
                sides = {}
                for side in ("A", "G"):
                    pre = f"kfac.{i}.{j}.{side}."
                    sides[side] = _factor_from_tensors(
                        tm[side], {k[len(pre) :]: v for k, v in state.items() if k.startswith(pre)}
                    )
                terms.append(KronTerm(sides["A"], sides["G"], float(tm["scale"])))
            layers.append(KFACLayer(lm["module"], lm["weight"], lm["bias"], terms))
        diag = None
        # the class comes from the curvature registry; files written before it named a module path instead
        kind = meta.get("diagonal_kind") or _LEGACY_DIAGONAL_CLASSES.get(meta.get("diagonal_class", ""))
        if kind is None and "diagonal_class" in meta:
            raise ValueError(f"unknown diagonal curvature {meta['diagonal_class']!r} in a K-FAC state")
        if kind is not None:
            part = {k[5:]: v for k, v in state.items() if k.startswith("diag.")}
            diag = curvature_class(kind).from_state_dict(part)
        return cls(
            layers,
            diag,
            damping=meta["damping"],
            cross_task=meta["cross_task"],
            mode=meta["mode"],
            task_weight=meta.get("task_weight", 1.0),
        )

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """In-place variant of :meth:`from_state_dict`."""
        other = type(self).from_state_dict(state)
        self.__dict__.update(other.__dict__)

    def __repr__(self) -> str:
        forms = {f"{t.A.form}/{t.G.form}" for layer in self.layers for t in layer.terms}
        return (
            f"KFACFisher(layers={len(self.layers)}, diagonal={type(self.diagonal).__name__ if self.diagonal else None}, "
            f"mode={self.mode}, cross_task={self.cross_task}, damping={self.damping}, forms={sorted(forms)}, "
            f"factor_MB={self.factor_nbytes / 2**20:.1f})"
        )


def _collapse(terms: list[KronTerm]) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``(A, G)`` of a single-term layer (merged mode)."""
    if len(terms) != 1:
        raise ValueError("merged mode expects one Kronecker term per layer")
    t = terms[0]
    return t.A.to_dense(), t.G.to_dense() * t.scale


def _eig_layer_penalty_grad_(
    layer: KFACLayer,
    named: Mapping[str, torch.Tensor],
    anchors: Mapping[str, torch.Tensor],
    lam: float,
    damping: float,
) -> torch.Tensor:
    """``grad += lam * G' X A'`` for one layer whose factors are all :class:`EigFactor`; returns ``lam/2 <X, G'X A'>``
    (detached fp32 tensor).

    With ``F' = Q D Q^T + r I`` for both (damped) factors, ``P = X Q_A`` and ``R = Q_G^T X``::

        G' X A' = Q_G U + r_G (P D_A) Q_A^T + r_A r_G X,   U = D_G (Q_G^T P D_A Q_A^T + r_A R)
        <X, G' X A'> = <R, U> + r_G <P, P D_A> + r_A r_G |X|^2

    The weight gradient is then two ``addmm_`` (``Q_G U`` and ``r_G (P D_A) Q_A^T``) straight into ``p.grad`` plus
    ``r_A r_G X``: no ``[out, in]`` temporary besides ``X`` itself, and the value comes from the small ``[k, in]``
    and ``[out, k]`` products (a generic ``matvec`` makes about twice the full-size memory passes).
    """
    w_name, b_name = layer.weight, layer.bias
    w = named[w_name]
    has_b = b_name is not None and b_name in named and b_name in anchors
    dw = (w.detach() - anchors[w_name].to(w.device)).float()
    db = (named[b_name].detach() - anchors[b_name].to(w.device)).float() if has_b else None  # type: ignore[index]
    n_in = dw.shape[1]
    grad_w = _fp32_grad(w)
    grad_b = _fp32_grad(named[b_name]) if has_b else None  # type: ignore[index]
    total: torch.Tensor | None = None
    for t in layer.terms:
        A, G = t.A, t.G
        assert isinstance(A, EigFactor) and isinstance(G, EigFactor)
        sa, sg = damping_shifts(A, G, damping)
        qa, qg = A.q.to(dw), G.q.to(dw)
        ra, rg = A.rho_value + sa, G.rho_value + sg
        da, dg = A.lam.to(dw) + sa - ra, G.lam.to(dw) + sg - rg
        qa_w = qa[:n_in]
        p_ = dw @ qa_w  # [out, kA]
        r_w = qg.T @ dw  # [kG, in]
        r_b = None
        if layer.bias is not None:  # A covers [W | b]: the bias row of Q_A
            if db is not None:
                p_.addr_(db, qa[n_in])
                r_b = qg.T @ db
        pd = p_ * da  # P D_A
        c = qg.T @ pd  # Q_G^T P D_A   [kG, kA]
        u_w = torch.addmm(r_w, c, qa_w.T, beta=ra, alpha=1.0) if ra else c @ qa_w.T
        u_w.mul_(dg[:, None])
        val = torch.vdot(r_w.reshape(-1), u_w.reshape(-1)).to(torch.float64)
        u_b = None
        if r_b is not None:
            u_b = (c @ qa[n_in] + ra * r_b) * dg
            val = val + torch.dot(r_b, u_b)
        alpha = lam * t.scale
        grad_w.addmm_(qg, u_w, alpha=alpha)
        if grad_b is not None and u_b is not None:
            grad_b.add_(qg @ u_b, alpha=alpha)
        if rg:
            val = val + rg * (p_ * pd).sum(dtype=torch.float64)
            grad_w.addmm_(pd, qa_w.T, alpha=alpha * rg)
            if grad_b is not None and u_b is not None:
                grad_b.add_(pd @ qa[n_in], alpha=alpha * rg)
        if ra and rg:
            sq = torch.vdot(dw.reshape(-1), dw.reshape(-1)).to(torch.float64)
            grad_w.add_(dw, alpha=alpha * ra * rg)
            if db is not None and grad_b is not None:
                sq = sq + torch.dot(db, db)
                grad_b.add_(db, alpha=alpha * ra * rg)
            val = val + ra * rg * sq
        total = t.scale * val if total is None else total + t.scale * val
    for name, g in ((w_name, grad_w), (b_name, grad_b)):
        if name is not None and g is not None and g is not named[name].grad:  # a low-precision .grad
            named[name].grad.add_(g.to(named[name].grad.dtype))  # type: ignore[union-attr]
    assert total is not None
    return (0.5 * lam * total).to(torch.float32)


def _low_rank_eig(layer: KFACLayer) -> bool:
    """Whether :func:`_eig_layer_penalty_grad_` is the cheaper path: every term in eigen form with
    ``k_A + k_G <= min(d_A, d_G) / 3`` (its ``k_A k_G (d_A + d_G)`` products outgrow the generic matvec's savings
    above that; measured on MiniLM's shapes: 0.7-0.9x the generic time at rank 64, 1.0-1.3x from rank 128-192)."""
    return all(
        isinstance(t.A, EigFactor)
        and isinstance(t.G, EigFactor)
        and 3 * (t.A.rank + t.G.rank) <= min(t.A.dim, t.G.dim)
        for t in layer.terms
    )


def _fp32_grad(p: torch.Tensor) -> torch.Tensor:
    """Where to accumulate ``p``'s penalty gradient in fp32: ``p.grad`` itself (created as zeros if missing) when
    it is fp32, else a zero fp32 buffer the caller adds into ``p.grad`` at the end."""
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad if p.grad.dtype == torch.float32 else torch.zeros_like(p.grad, dtype=torch.float32)


def _layer_penalty_grad_(
    fisher: KFACFisher,
    layer: KFACLayer,
    named: Mapping[str, torch.Tensor],
    anchors: Mapping[str, torch.Tensor],
    lam: float,
) -> torch.Tensor:
    """``grad += lam * G' X A'`` for one layer (``X = [dW | db]``, any factor form); returns ``lam/2 <X, G'X A'>``
    as a detached fp32 tensor."""
    w = named[layer.weight]
    delta = {layer.weight: w.detach() - anchors[layer.weight].to(w.device)}
    b_name = layer.bias
    if b_name is not None and b_name in named and b_name in anchors:
        delta[b_name] = named[b_name].detach() - anchors[b_name].to(w.device)
    x = fisher._stack(layer, delta)
    assert x is not None
    x = x.to(torch.float32)
    y = fisher._layer_matvec(layer, x)
    value = torch.vdot(x.reshape(-1), y.reshape(-1)).to(torch.float64)
    n_in = delta[layer.weight].shape[1]
    for name, g in ((layer.weight, y[:, :n_in] if b_name is not None else y), (b_name, y[:, -1])):
        if name is None or name not in delta:
            continue
        p = named[name]
        if p.grad is None:
            p.grad = (lam * g).to(p.dtype).contiguous()
        else:
            p.grad.add_(g.to(p.grad.dtype), alpha=lam)
    return (0.5 * lam * value).to(torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Collection (hooks)
# ----------------------------------------------------------------------------------------------------------


def _with_ones(x: torch.Tensor, bias: bool) -> torch.Tensor:
    """``x_bar = [x, 1]`` when ``bias`` (the bias folded into A), else ``x``."""
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1) if bias else x


def _outer_sum(x: torch.Tensor, bias: bool) -> torch.Tensor:
    """``x_bar^T x_bar`` for rows ``x`` of shape ``[n, d]`` (``x_bar = [x, 1]`` when ``bias``)."""
    x = _with_ones(x, bias)
    return x.T @ x


def _add_outer_(acc: torch.Tensor, x: torch.Tensor, buffers: dict[Any, torch.Tensor] | None = None) -> None:
    """``acc += x^T x`` in place (no [d, d] temporary when the dtypes agree: a fresh 9 MB product per layer and
    batch, then a separate add, measured several times the cost of the product itself on CPU).

    A lower-precision ``x`` (``compute_dtype``) is multiplied with its transpose made contiguous (the bf16
    matmul kernels are ~2x faster on it) into a reused buffer from ``buffers``, then added into the fp32 sum.
    """
    if x.dtype == acc.dtype:
        acc.addmm_(x.T, x)
        return
    d = x.shape[1]
    key = (d, x.dtype, x.device)
    buf = None if buffers is None else buffers.get(key)
    if buf is None:
        buf = torch.empty(d, d, dtype=x.dtype, device=x.device)
        if buffers is not None:
            buffers[key] = buf
    acc.add_(torch.mm(x.T.contiguous(), x, out=buf))


def _symmetric_mean_(total: torch.Tensor, count: float) -> torch.Tensor:
    """``(S + S^T) / (2 count)`` in fp32, in ``total``'s own storage when it is fp32 (the sum is consumed).

    The sums are built from ``x^T x`` products, which the CPU BLAS returns exactly symmetric; that is checked on
    a strip of rows (a full transposed comparison costs as much as the symmetrisation), and a sum found
    asymmetric is symmetrised. A whole-matrix ``out + out.T`` allocates a fresh ``[d, d]`` tensor and reads one
    operand transposed: for MiniLM's 38 factor pairs that was a visible part of the factor pass. An asymmetry
    outside the strip would be at rounding level, which no consumer is sensitive to (``eigh`` reads one
    triangle).
    """
    out = total if total.dtype == torch.float32 else total.float()
    out.mul_(1.0 / count)
    k = min(16, out.shape[0])
    if not (torch.equal(out[:k], out[:, :k].T) and torch.equal(out[-k:], out[:, -k:].T)):
        out = (out + out.T).mul_(0.5)
    return out


def _grouped_calls(recs: list[Record], attr: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All calls of one module in the batch as ``[B, n, d]`` (positions of example b along dim 1) + float mask."""
    xs, ms = [], []
    for r in recs:
        t = r.grouped(getattr(r, attr))
        xs.append(t)
        m = r.grouped_mask()
        ms.append(None if m is None else m.to(t.dtype))
    x = xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)
    if all(m is None for m in ms):
        return x, None
    mask = torch.cat([m if m is not None else t.new_ones(t.shape[:2]) for m, t in zip(ms, xs)], dim=1)
    return x, (None if bool(mask.all()) else mask)


class KFACCollector:
    r"""K-FAC factors of trainable Linear layers (+ the diagonal Fisher of every other parameter) in one pass.

    Implements the ``FisherCollector`` protocol of :func:`~hf_continual.curvature.estimate.estimate_fisher`
    (``estimate_fisher(model, ds, kind="kfac", **kwargs)`` builds ``KFACCollector(**kwargs)``). Layer inputs and
    output gradients are captured by :class:`~hf_continual.curvature._hooks.LayerCapture`; A is accumulated once
    per batch (the Monte-Carlo samples share the forward), G after every backward. Because the backward is of the
    SUM of per-example losses, the output gradient rows of example ``n`` are the gradient of its own loss.

    Args:
        kfac_mode: ``"reduce"`` (default: cheaper, and measured closer to the exact Fisher block for
            per-sequence losses; see bench/bench_kfac.py) or ``"expand"``. ``mode`` is an alias.
        include: regex (``re.search`` on the module name) or predicate ``(name, module) -> bool`` selecting
            Linear modules; default all trainable ``nn.Linear`` whose weight is not shared (tied weights go to
            the diagonal part).
        diagonal: collect the diagonal Fisher of every other trainable parameter (``DiagonalCollector``).
        compute_dtype: dtype of the outer products (default: the activations' dtype). ``torch.bfloat16`` runs
            the large products on bf16 matmul units (~3 significant digits per batch contribution).
        damping, cross_task: passed to :class:`KFACFisher`.
        diagonal_kwargs: extra keyword arguments for ``DiagonalCollector``.
        layer_modes: per-layer override ``{regex: mode}`` (first ``re.search`` match on the module name wins),
            e.g. ``{r"attention\.self\.key": "expand"}``: under ``reduce`` the key projection's G is ~0
            (the softmax gradients of a query sum to zero over keys, so the token-summed key gradient vanishes),
            which leaves key weights unprotected; ``expand`` sees them. ``None`` (default) means
            :data:`DEFAULT_LAYER_MODES` under ``reduce`` and nothing under ``expand``; ``{}`` disables overrides.
    """

    def __init__(
        self,
        kfac_mode: KFACMode | None = None,
        include: str | Callable[[str, nn.Module], bool] | None = None,
        diagonal: bool = True,
        compute_dtype: torch.dtype | None = None,
        damping: float = 0.0,
        cross_task: CrossTask = "merged",
        diagonal_kwargs: dict[str, Any] | None = None,
        mode: KFACMode | None = None,
        layer_modes: Mapping[str, KFACMode] | None = None,
    ) -> None:
        mode = kfac_mode or mode or DEFAULT_MODE
        if mode not in ("expand", "reduce"):
            raise ValueError(f"kfac_mode must be 'expand' or 'reduce', got {mode!r}")
        self.mode: KFACMode = mode
        self.include = include
        self.collect_diagonal = diagonal
        self.compute_dtype = compute_dtype
        self._buffers: dict[Any, torch.Tensor] = {}  # product buffers for a lower-precision compute_dtype
        self.damping = damping
        self.cross_task: CrossTask = cross_task
        self.diagonal_kwargs = diagonal_kwargs or {}
        if layer_modes is None:
            layer_modes = DEFAULT_LAYER_MODES if mode == "reduce" else {}
        self.layer_modes = dict(layer_modes)
        for m in self.layer_modes.values():
            if m not in ("expand", "reduce"):
                raise ValueError(f"layer_modes values must be 'expand' or 'reduce', got {m!r}")
        self.layers: dict[str, KFACLayer] = {}
        self._mode_of: dict[str, KFACMode] = {}
        self.capture: LayerCapture | None = None
        self.diag: Any = None
        self._sums: dict[str, torch.Tensor] = {}
        #: reduce-mode rows (one per example) waiting for their outer product, per factor sum: see _add_rows_
        self._pending: dict[str, list[torch.Tensor]] = {}
        self._batch_examples = 0
        self._backwards = 0

    # --- selection ------------------------------------------------------------------------------------------
    def _selected(self, name: str, module: nn.Module) -> bool:
        if self.include is None:
            return True
        if callable(self.include):
            return bool(self.include(name, module))
        return re.search(self.include, name) is not None

    def select(self, model: nn.Module) -> dict[str, KFACLayer]:
        """The Linear modules this collector covers, as empty :class:`KFACLayer` s."""
        uses = Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)
        pname = {id(p): n for n, p in model.named_parameters()}
        out: dict[str, KFACLayer] = {}
        for name, mod in model.named_modules():
            if type(mod).forward is not nn.Linear.forward or not isinstance(mod, nn.Linear):
                continue
            w = mod.weight
            if not w.requires_grad or uses[id(w)] != 1 or not self._selected(name, mod):
                continue
            b = mod.bias
            has_b = b is not None and b.requires_grad and uses[id(b)] == 1
            out[name] = KFACLayer(name, pname[id(w)], pname[id(b)] if has_b else None)
        return out

    def mode_for(self, name: str) -> KFACMode:
        """The sequence convention used for module ``name``."""
        for pattern, m in self.layer_modes.items():
            if re.search(pattern, name):
                return m
        return self.mode

    # --- protocol -------------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Choose layers, allocate the sums, register hooks (and the diagonal collector for the rest)."""
        self.layers = self.select(model)
        self._mode_of = {name: self.mode_for(name) for name in self.layers}
        modules = dict(model.named_modules())
        self._sums = {}
        self._pending = {}
        covered: set[str] = set()
        dev = next(model.parameters()).device
        for name, layer in self.layers.items():
            mod = modules[name]
            assert isinstance(mod, nn.Linear)
            covered.add(layer.weight)
            if layer.bias is not None:
                covered.add(layer.bias)
            da = mod.in_features + (layer.bias is not None)
            self._sums[f"kfac:{name}:A"] = torch.zeros(da, da, device=dev)
            self._sums[f"kfac:{name}:G"] = torch.zeros(mod.out_features, mod.out_features, device=dev)
            self._sums[f"kfac:{name}:nA"] = torch.zeros((), dtype=torch.float64, device=dev)
        self._sums["kfac:gcount"] = torch.zeros((), dtype=torch.float64, device=dev)
        self.capture = LayerCapture({n: modules[n] for n in self.layers})
        self.capture.attach()
        rest = {n for n, p in model.named_parameters() if p.requires_grad and n not in covered}
        self.diag = None
        if self.collect_diagonal and rest:
            from .diagonal import DiagonalCollector

            self.diag = DiagonalCollector(param_filter=rest, **self.diagonal_kwargs)
            self.diag.attach(model)

    def begin_batch(
        self, num_examples: int, rows_per_example: int, attention_mask: torch.Tensor | None
    ) -> None:
        """A new batch of ``num_examples`` examples (``rows_per_example`` contiguous rows each)."""
        assert self.capture is not None, "attach() first"
        self.capture.begin_batch(num_examples, rows_per_example, attention_mask)
        self._batch_examples = int(num_examples)
        self._backwards = 0
        if self.diag is not None:
            self.diag.begin_batch(num_examples, rows_per_example, attention_mask)

    def grad_targets(self) -> list[torch.Tensor] | None:
        """Layer outputs whose gradients are needed (no parameter gradient is formed)."""
        assert self.capture is not None
        out = self.capture.grad_targets()
        if self.diag is not None:
            d = self.diag.grad_targets() if hasattr(self.diag, "grad_targets") else None
            if d is None:
                return None
            out = out + d
        return out

    def after_backward(self) -> None:
        """Accumulate A (first backward of the batch only) and G from the captured records."""
        assert self.capture is not None
        by_name: dict[str, list[Record]] = defaultdict(list)
        for rec in self.capture.records:
            by_name[rec.name].append(rec)
        if self._backwards == 0:
            cache: dict[tuple[Any, ...], torch.Tensor] = {}
            shared = Counter(self._a_key(name, recs) for name, recs in by_name.items())
            for name, recs in by_name.items():
                self._accumulate_a(name, recs, cache, shared)
        for name, recs in by_name.items():
            recs = [r for r in recs if r.grad is not None]
            if recs:
                self._accumulate_g(name, recs)
        self.capture.clear_grads()
        self._sums["kfac:gcount"] += self._batch_examples
        self._backwards += 1
        if self.diag is not None:
            self.diag.after_backward()

    def detach(self) -> None:
        """Remove hooks (and free the product buffers); pending reduce-mode rows are multiplied out first."""
        self._flush_rows_()
        self._buffers.clear()
        if self.capture is not None:
            self.capture.detach()
        if self.diag is not None:
            self.diag.detach()

    def fallback_params(self) -> dict[str, nn.Parameter]:
        """Parameters of the diagonal part without a hook rule (the estimator's per-example loop)."""
        return self.diag.fallback_params() if self.diag is not None else {}

    def add_fallback(self, name: str, sq_grad_sum: torch.Tensor) -> None:
        """Forwarded to the diagonal part."""
        self.diag.add_fallback(name, sq_grad_sum)

    def sums(self) -> dict[str, torch.Tensor]:
        """Factor sums and counts (``kfac:*``) and the diagonal part's sums (``diag:*``), to all-reduce (SUM)."""
        self._flush_rows_()
        out = dict(self._sums)
        if self.diag is not None:
            out.update({f"diag:{k}": v for k, v in self.diag.sums().items()})
        return out

    def finalize(
        self, sums: Mapping[str, torch.Tensor], num_examples: int, mc_samples: int = 1
    ) -> KFACFisher:
        """Build the :class:`KFACFisher` from the (all-reduced) sums; the factor sums are consumed (scaled and
        symmetrised in place)."""
        gcount = float(sums["kfac:gcount"]) if "kfac:gcount" in sums else 0.0
        if gcount <= 0:
            gcount = float(num_examples * mc_samples)
        if gcount <= 0:
            raise ValueError("no example was seen: cannot estimate a Fisher")
        layers = []
        for name, layer in self.layers.items():
            na = float(sums[f"kfac:{name}:nA"])
            a = _symmetric_mean_(sums[f"kfac:{name}:A"], max(na, 1.0))
            g = _symmetric_mean_(sums[f"kfac:{name}:G"], gcount)
            terms = [KronTerm(DenseFactor(a), DenseFactor(g))]
            layers.append(KFACLayer(layer.module, layer.weight, layer.bias, terms))
        diag = None
        if self.diag is not None:
            dsums = {k[5:]: v for k, v in sums.items() if k.startswith("diag:")}
            diag = self.diag.finalize(dsums, num_examples, mc_samples)
        return KFACFisher(layers, diag, damping=self.damping, cross_task=self.cross_task, mode=self.mode)

    # --- accumulation ---------------------------------------------------------------------------------------
    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.compute_dtype is None else x.to(self.compute_dtype)

    def _a_key(self, name: str, recs: list[Record]) -> tuple[Any, ...]:
        """Identity of a layer's A contribution this batch: same inputs, bias and mode = same product."""
        inputs = tuple(
            (r.input.data_ptr(), r.input.shape, r.input.stride(), r.input._version, r.token_mask is None)
            for r in recs
        )
        return (*inputs, self.layers[name].bias is not None, self._mode_of[name])

    def _accumulate_a(
        self,
        name: str,
        recs: list[Record],
        cache: dict[tuple[Any, ...], torch.Tensor],
        shared: Mapping[tuple[Any, ...], int],
    ) -> None:
        bias = self.layers[name].bias is not None
        key = self._a_key(name, recs)
        mode = self._mode_of[name]
        x, mask = _grouped_calls(recs, "input")
        b = x.shape[0]
        if mode == "reduce":
            count = float(b)
        else:
            count = float(mask.sum()) if mask is not None else float(x.shape[0] * x.shape[1])
        if mode == "reduce":
            if mask is None:
                a = x.mean(dim=1)
            else:
                w = mask / mask.sum(1, keepdim=True).clamp_min(1.0)
                a = torch.bmm(w[:, None, :], x)[:, 0]
        else:
            a = x.reshape(-1, x.shape[-1])
            if mask is not None:
                a = a[mask.reshape(-1) != 0]
        acc = self._sums[f"kfac:{name}:A"]
        if shared.get(key, 1) > 1:  # q/k/v of an attention block read the same tensor: one product for all
            if key not in cache:
                cache[key] = _outer_sum(self._cast(a), bias).float()
            acc += cache[key]
        elif mode == "reduce":
            self._add_rows_(f"kfac:{name}:A", _with_ones(self._cast(a), bias))
        else:
            _add_outer_(acc, _with_ones(self._cast(a), bias), self._buffers)
        self._sums[f"kfac:{name}:nA"] += count

    def _accumulate_g(self, name: str, recs: list[Record]) -> None:
        g, mask = _grouped_calls(recs, "grad")
        if self._mode_of[name] == "reduce":
            g = g.sum(1) if mask is None else torch.bmm(mask[:, None, :], g)[:, 0]
            self._add_rows_(f"kfac:{name}:G", self._cast(g))
            return
        g = g.reshape(-1, g.shape[-1])
        if mask is not None:
            g = g[mask.reshape(-1) != 0]
        _add_outer_(self._sums[f"kfac:{name}:G"], self._cast(g), self._buffers)

    def _add_rows_(self, key: str, rows: torch.Tensor) -> None:
        """``sums[key] += rows^T rows``, deferred until :data:`PENDING_ROWS` rows are waiting.

        Under ``reduce`` a batch gives one row per example (32 rows against a ``[1537, 1537]`` sum): a product
        per batch re-reads and re-writes the whole sum, which the forward and backward in between have pushed out
        of cache. Stacking the rows of 8 batches into one product cut ``addmm_`` in MiniLM's reduce pass from
        0.165 s to 0.120 s (cProfile, 2-core CPU); the whole pass gains 0-3% (``bench_kfac.py --sections
        pending``). ``rows`` must be a fresh tensor (not a view of a captured activation): it is kept until the
        flush.
        """
        pend = self._pending.setdefault(key, [])
        pend.append(rows)
        if sum(r.shape[0] for r in pend) >= PENDING_ROWS:
            self._flush_rows_(key)

    def _flush_rows_(self, key: str | None = None) -> None:
        """Multiply out the pending rows of ``key`` (all keys when None) into their sums."""
        for k in [key] if key is not None else list(self._pending):
            pend = self._pending.pop(k, [])
            if pend:
                _add_outer_(self._sums[k], pend[0] if len(pend) == 1 else torch.cat(pend), self._buffers)

