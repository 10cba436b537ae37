"""Exact per-example diagonal Fisher collector (``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm`` hook rules)."""

from __future__ import annotations

import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F
from torch import nn

from ..diagonal import DiagonalFisher
from .hooks import LayerCapture, Record

ParamFilter = Callable[[str], bool] | Collection[str] | None


def _make_filter(param_filter: ParamFilter) -> Callable[[str], bool]:
    if param_filter is None:
        return lambda name: True
    if callable(param_filter):
        return param_filter
    allowed = set(param_filter)
    return allowed.__contains__


def _is_plain(module: nn.Module, cls: type[nn.Module]) -> bool:
    """``module`` is a ``cls`` whose forward is ``cls.forward`` (so the closed-form rule is exact)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


class DiagonalCollector:
    """Exact per-example diagonal Fisher for :func:`estimate_fisher` (implements ``FisherCollector``).

    Rules (per example ``n``, summed over all its positions and over every call of the module in the forward,
    then squared): ``nn.Linear`` weight ``sum_t g a^T`` and bias ``sum_t g``; ``nn.Embedding`` a scatter-add of
    ``g`` over the example's ids (``padding_idx`` excluded, broadcast position embeddings expanded per row);
    ``nn.LayerNorm`` weight ``sum_t g * x_hat`` and bias ``sum_t g``. Trainable parameters with no rule (custom
    modules, tied weights, subclasses with their own forward) are returned by :meth:`fallback_params` and the
    estimator computes them with an exact per-example autograd loop (slower; warned once).

    Args:
        param_filter: restrict to these parameter names (a collection, or a predicate on the name); None = all
            trainable parameters. K-FAC uses this to get the diagonal of the non-Linear parameters in its pass.
    """

    kind = "diagonal"

    def __init__(
        self,
        param_filter: ParamFilter = None,
    ) -> None:
        self.param_filter = _make_filter(param_filter)
        self.capture: LayerCapture | None = None
        self._acc: dict[str, torch.Tensor] = {}
        self._rules: dict[str, tuple[str, nn.Module, str | None, str | None]] = {}
        self._fallback: dict[str, nn.Parameter] = {}

    # -- FisherCollector ------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Choose a rule per module, allocate the sums, register hooks."""
        name_of = {id(p): n for n, p in model.named_parameters() if p.requires_grad and self.param_filter(n)}
        uses = Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)
        covered: set[int] = set()
        hooked: dict[str, nn.Module] = {}
        for mname, module in model.named_modules():
            if _is_plain(module, nn.Linear) or _is_plain(module, nn.LayerNorm):
                rule = "linear" if isinstance(module, nn.Linear) else "layernorm"
            elif (
                _is_plain(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq
            ):
                rule = "embedding"
            else:
                continue
            names: list[str | None] = []
            for attr in ("weight", "bias"):
                p = getattr(module, attr, None)
                ok = isinstance(p, nn.Parameter) and id(p) in name_of and uses[id(p)] == 1
                names.append(name_of[id(p)] if ok else None)
                if ok:
                    covered.add(id(p))
            if any(names):
                self._rules[mname] = (rule, module, names[0], names[1])
                hooked[mname] = module
        self._fallback = {
            n: p for n, p in model.named_parameters() if id(p) in name_of and id(p) not in covered
        }
        if self._fallback:
            warnings.warn(
                "Fisher: no per-example hook rule for "
                + ", ".join(self._fallback)
                + "; using an exact per-example autograd loop for them (slower).",
                stacklevel=3,
            )
        self._acc = {
            n: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            for n, p in model.named_parameters()
            if id(p) in name_of
        }
        self.capture = LayerCapture(hooked, expand_broadcast=True)
        self.capture.attach()

    def begin_batch(
        self, num_examples: int, rows_per_example: int, attention_mask: torch.Tensor | None
    ) -> None:
        assert self.capture is not None, "attach() first"
        self.capture.begin_batch(num_examples, rows_per_example, attention_mask)

    def grad_targets(self) -> list[torch.Tensor]:
        assert self.capture is not None
        return self.capture.grad_targets()

    def after_backward(self) -> None:
        """Square and accumulate the per-example gradients of the backward that just ran."""
        assert self.capture is not None
        by_module: dict[str, list[Record]] = defaultdict(list)
        for rec in self.capture.records:
            if rec.grad is not None:
                by_module[rec.name].append(rec)
        for mname, recs in by_module.items():
            rule, module, wname, bname = self._rules[mname]
            if rule == "linear":
                self._linear(recs, wname, bname)
            elif rule == "embedding":
                self._embedding(module, recs, wname)
            else:
                self._layernorm(module, recs, wname, bname)
        self.capture.clear_grads()

    def detach(self) -> None:
        if self.capture is not None:
            self.capture.detach()

    def sums(self) -> dict[str, torch.Tensor]:
        """Running sums over examples (and MC samples) of squared per-example gradients."""
        return self._acc

    def finalize(self, sums: dict[str, torch.Tensor], num_examples: int, mc_samples: int) -> DiagonalFisher:
        if num_examples <= 0:
            raise ValueError("no example was seen: cannot estimate a Fisher")
        c = 1.0 / (num_examples * mc_samples)
        return DiagonalFisher({n: t * c for n, t in sums.items()})

    # -- exact per-example loop hand-off (optional protocol extension) -------------------------------------
    def fallback_params(self) -> dict[str, nn.Parameter]:
        """Parameters with no hook rule: the estimator computes their per-example squares by autograd."""
        return self._fallback

    def add_fallback(self, name: str, sq_grad_sum: torch.Tensor) -> None:
        """Add a sum over examples of squared per-example gradients for a fallback parameter."""
        self._acc[name] += sq_grad_sum.to(self._acc[name])

    # -- rules ----------------------------------------------------------------------------------------------
    def _linear(self, recs: list[Record], wname: str | None, bname: str | None) -> None:
        gs = [r.grouped(r.grad).float() for r in recs]  # [B, n, out]
        b = gs[0].shape[0]
        if bname is not None:
            gb = sum(g.sum(1) for g in gs)
            self._acc[bname] += gb.square().sum(0)
        if wname is None:
            return
        acts = [r.grouped(r.input).float() for r in recs]  # [B, n, in]
        acc = self._acc[wname]
        if (
            len(recs) == 1 and gs[0].shape[1] == 1
        ):  # one position: (g a^T)^2 = g^2 (a^2)^T, no [B, o, i] buffer
            g, a = gs[0][:, 0], acts[0][:, 0]
            acc.addmm_(g.square().t(), a.square())
            return
        # one [out, in] gradient per example, squared into the sum while it is still in cache: a batched
        # [B, out, in] buffer (bmm, then square and sum) is memory-bound and measured 3x slower on MiniLM
        buf = torch.empty_like(acc)
        for i in range(b):
            torch.mm(gs[0][i].t(), acts[0][i], out=buf)
            for g, a in zip(gs[1:], acts[1:]):
                buf.addmm_(g[i].t(), a[i])
            acc.addcmul_(buf, buf)

    def _embedding(self, module: nn.Embedding, recs: list[Record], wname: str | None) -> None:
        if wname is None:
            return
        vocab, dim = module.weight.shape
        keys, grads = [], []
        for r in recs:
            g = r.grad
            ids = r.input
            if ids.shape != g.shape[:-1]:
                ids = ids.expand(g.shape[:-1])
            b = r.num_examples
            r.rows_per_example  # noqa: B018  (validates the row grouping)
            ids = ids.reshape(b, -1)
            g = g.reshape(b, -1, dim).float()
            k = (torch.arange(b, device=ids.device).unsqueeze(1) * vocab + ids).reshape(-1)
            g = g.reshape(-1, dim)
            if module.padding_idx is not None:
                keep = ids.reshape(-1) != module.padding_idx
                k, g = k[keep], g[keep]
            keys.append(k)
            grads.append(g)
        k = torch.cat(keys)
        g = torch.cat(grads)
        uniq, inv = torch.unique(k, return_inverse=True)
        per_ex = torch.zeros(uniq.numel(), dim, dtype=torch.float32, device=g.device).index_add_(0, inv, g)
        self._acc[wname].index_add_(0, uniq % vocab, per_ex.square_())

    def _layernorm(
        self, module: nn.LayerNorm, recs: list[Record], wname: str | None, bname: str | None
    ) -> None:
        shape = tuple(module.normalized_shape)
        d = math.prod(shape)
        gw = gb = None
        for r in recs:
            b = r.num_examples
            r.rows_per_example  # noqa: B018
            g = r.grad.float()
            if bname is not None:
                t = g.reshape(b, -1, d).sum(1)
                gb = t if gb is None else gb + t
            if wname is not None:
                x_hat = F.layer_norm(r.input.float(), shape, None, None, module.eps)
                t = (g * x_hat).reshape(b, -1, d).sum(1)
                gw = t if gw is None else gw + t
        if gw is not None:
            self._acc[wname] += gw.square().sum(0).reshape(shape)
        if gb is not None:
            self._acc[bname] += gb.square().sum(0).reshape(shape)
