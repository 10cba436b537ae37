"""K-FAC collector: the factors A and G of every trainable ``nn.Linear`` (+ the diagonal of the rest) in one pass.

See :mod:`hf_continual.curvature.kfac` for the representation and the sequence conventions (``expand`` /
``reduce``); this module only accumulates the factor sums from captured layer inputs and output gradients.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..factors import DenseFactor
from ..kfac import CrossTask, KFACFisher, KFACLayer, KFACMode, KronTerm
from .hooks import LayerCapture, Record

#: default sequence convention (see the module docstring and bench/bench_kfac.py for the measurement)
DEFAULT_MODE: KFACMode = "reduce"
#: reduce-mode rows buffered per factor sum before one stacked outer product (KFACCollector._add_rows_)
PENDING_ROWS = 256
#: per-layer overrides applied under ``reduce`` unless ``layer_modes`` is given: the attention key projection of
#: BERT-style models gets ``expand`` (under ``reduce`` its G vanishes: see KFACCollector)
DEFAULT_LAYER_MODES: dict[str, KFACMode] = {r"attention\.self\.key$": "expand"}


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
    output gradients are captured by :class:`~hf_continual.curvature.collectors.hooks.LayerCapture`; A is accumulated once
    per batch (the Monte-Carlo samples share the forward), G after every backward. Because the backward is of the
    SUM of per-example losses, the output gradient rows of example ``n`` are the gradient of its own loss.

    Args:
        kfac_mode: ``"reduce"`` (default: cheaper, and measured closer to the exact Fisher block for
            per-sequence losses; see bench/bench_kfac.py) or ``"expand"``.
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
        layer_modes: Mapping[str, KFACMode] | None = None,
    ) -> None:
        mode = kfac_mode or DEFAULT_MODE
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
