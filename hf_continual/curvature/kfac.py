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
stored in bfloat16 (:mod:`.factors`). ``quadratic``/``matvec`` work directly in either form. The factors are
estimated by :class:`~hf_continual.curvature.collectors.kfac.KFACCollector`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .base import Curvature, Params, curvature_class
from .factors import DenseFactor, EigFactor, Factor, damping_shifts, eig_compress, factor_from_tensors

KFACMode = Literal["expand", "reduce"]
CrossTask = Literal["merged", "per_task"]

_META_KEY = "kfac.__meta__"
#: ``diagonal_class`` values written by earlier versions -> curvature kind (old state files still load)
_LEGACY_DIAGONAL_CLASSES = {"hf_continual.curvature.diagonal:DiagonalFisher": "diagonal"}


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
                dev = t.G.device  # drawn on the CPU (same draws on every device), used where the factors are
                delta[layer.weight] = torch.randn(t.G.dim, din, generator=gen).to(dev)
                if layer.bias is not None:
                    delta[layer.bias] = torch.randn(t.G.dim, generator=gen).to(dev)
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
                    sides[side] = factor_from_tensors(
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
