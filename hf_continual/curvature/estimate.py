"""One pass over data that estimates a Fisher: empirical or true (sampled), exact per-example, distributed-aware.

The loop is generic over *collectors* (:class:`FisherCollector`); a collector turns captured layer quantities into
running sums and finally into a :class:`~hf_continual.curvature.base.Curvature`. ``DiagonalCollector`` gives a
:class:`~hf_continual.curvature.diagonal.DiagonalFisher`; ``hf_continual.curvature.collectors.kfac.KFACCollector`` gives
K-FAC factors.

Per batch the estimator does ONE forward of the whole batch (eval mode, so examples do not interact) and, per
Monte Carlo sample, ONE backward of the SUM of per-example losses. Because examples are independent, the slice of
a layer's output gradient that belongs to example ``n`` is the gradient of example ``n``'s own loss, so collectors
can form exact per-example quantities (never the square of a minibatch-mean gradient, which is biased).

Loss. ``logits`` is ``[B, C]`` with labels ``[B]`` (sequence classification; a dual encoder scoring K candidates
gives ``[B, K]``) or ``[B, T, C]`` with labels ``[B, T]`` where ``-100`` marks ignored positions. The per-example
loss is the sum over its valid positions of ``-log p(y | x)``; ``y`` is the gold label ("empirical") or drawn
from ``softmax(logits)`` at each valid position ("true", ``mc_samples`` independent draws averaged). The Fisher
is ``(1/N) sum_n E_y[g_n g_n^T]`` with N the number of examples (not tokens).

Collector protocol (:class:`FisherCollector`), called in this order::

    c.attach(model)                                   # once: choose layers, allocate sums, register hooks
    for each batch:
        c.begin_batch(B, r, attention_mask)           # B examples, r = model.rows_per_example(inputs) or 1
        model(**inputs)                               # forward hooks record inputs/outputs (see collectors/hooks.py)
        for each MC sample:
            backward of sum_n loss_n                  # towards c.grad_targets() (parameter grads not formed)
            c.after_backward()                        # consume the captured output grads: accumulate sums
        [exact per-example autograd loop for c.fallback_params(), results via c.add_fallback(name, sq)]
    c.detach()
    sums = c.sums(); all_reduce(SUM) every tensor and the example count across ranks (if distributed)
    curvature = c.finalize(sums, global_num_examples, mc_samples)

Optional collector methods: ``grad_targets() -> list[Tensor] | None`` (tensors whose gradient the collector
needs; when every collector has it the estimator calls ``torch.autograd.grad`` on them, which skips parameter
gradients entirely; otherwise it falls back to ``backward()`` into the trainable parameters with their ``.grad``
saved and restored), ``fallback_params() -> dict[str, Parameter]`` and ``add_fallback(name, sq_grad_sum)``.
``sums()`` must return the same keys and shapes on every rank, even on a rank that saw no example.

Helpers for collector authors: :class:`hf_continual.curvature.collectors.hooks.LayerCapture` records, per call of each
hooked module, the detached input, the output, the output gradient after a backward, the ``[R, T]`` token mask
of the batch when it aligns with the module's rows, and the row -> example grouping (``Record.grouped``).
``KFACCollector`` shows how to combine collectors in one pass (K-FAC on Linear layers, a
``DiagonalCollector(param_filter=...)`` for everything else).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from .base import Curvature
from .collectors.diagonal import DiagonalCollector
from .collectors.hooks import capture_paused

__all__ = ["FisherCollector", "estimate_fisher", "unwrap_model"]

_LABEL_KEYS = ("labels", "label", "label_ids")
IGNORE_INDEX = -100


@runtime_checkable
class FisherCollector(Protocol):
    """What :func:`estimate_fisher` drives (see the module docstring for the call order and optional methods)."""

    def attach(self, model: nn.Module) -> None:
        """Register hooks on the (unwrapped) model and allocate the running sums."""

    def begin_batch(
        self, num_examples: int, rows_per_example: int, attention_mask: torch.Tensor | None
    ) -> None:
        """A new batch of ``num_examples`` examples starts; drop what was captured for the previous one."""

    def after_backward(self) -> None:
        """One backward (one MC sample) is done: accumulate into the running sums."""

    def detach(self) -> None:
        """Remove hooks."""

    def sums(self) -> dict[str, torch.Tensor]:
        """Running sums over examples (and MC samples) to all-reduce (SUM) across ranks; same keys on every rank."""

    def finalize(self, sums: dict[str, torch.Tensor], num_examples: int, mc_samples: int) -> Curvature:
        """Build the curvature from the (reduced) sums, the global example count and the MC sample count."""


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip ``DistributedDataParallel`` / ``DataParallel`` wrappers (estimation must not all-reduce grads)."""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    return model


def _dist_world(group: Any = None) -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _forward_columns(model: nn.Module) -> set[str] | None:
    """Names ``model.forward`` accepts, or None when it takes ``**kwargs`` (keep everything)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def _clean_example(example: Any, allowed: set[str] | None, label_key: str) -> Any:
    """Drop columns the model does not take and values that cannot be tensors (strings, None)."""
    if not isinstance(example, Mapping):
        return example
    keep = {}
    for k, v in example.items():
        if allowed is not None and k not in allowed and k != label_key and k not in _LABEL_KEYS:
            continue
        if v is None or isinstance(v, str):
            continue
        if isinstance(v, list | tuple) and v and isinstance(v[0], str):
            continue
        keep[k] = v
    return keep


def _example_stream(
    dataset: Any, num_samples: int | None, rank: int, world: int
) -> tuple[Iterator[Any], int | None]:
    """This rank's ``(global index, example)`` pairs (``i % world == rank`` among the first ``num_samples``)
    and their count if known."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        n = len(dataset)
        if num_samples is not None:
            n = min(n, num_samples)
        idx = range(rank, n, world)
        return ((i, dataset[i]) for i in idx), len(idx)

    def gen() -> Iterator[Any]:
        for i, ex in enumerate(dataset):
            if num_samples is not None and i >= num_samples:
                return
            if i % world == rank:
                yield i, ex

    return gen(), None


def _batches(examples: Iterator[Any], batch_size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for ex in examples:
        batch.append(ex)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_to_device(v, device) for v in x)
    return x


def _get_logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is None:
        raise ValueError("the model output has no `logits`; the Fisher estimator needs them")
    return logits


def _sample_labels(logits: torch.Tensor, seed: int | None, indices: list[int], draw: int) -> torch.Tensor:
    """Draw ``y ~ softmax(logits)`` independently at every position (no gradient).

    With a ``seed``, the uniforms of example ``i`` (its index in the whole dataset) and draw ``d`` come from a
    generator seeded by ``(seed, i, d)`` alone: the same labels whatever the batch size or the number of
    processes, so a sharded estimate equals the single-process one. Without a seed, the global RNG is used.
    """
    probs = torch.softmax(logits.detach().float(), dim=-1)
    if seed is None:
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1).reshape(logits.shape[:-1])
    per_example = probs.shape[1:-1].numel() if probs.dim() > 2 else 1
    u = torch.stack(
        [
            torch.rand(
                per_example, generator=torch.Generator().manual_seed((seed * 1_000_003 + i) * 131 + draw)
            )
            for i in indices
        ]
    ).to(probs.device)
    cdf = probs.reshape(len(indices), per_example, -1).cumsum(-1)
    y = torch.searchsorted(cdf, u.unsqueeze(-1)).squeeze(-1).clamp_max(probs.shape[-1] - 1)
    return y.reshape(logits.shape[:-1])


def _valid_mask(
    logits: torch.Tensor, labels: torch.Tensor | None, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    shape = logits.shape[:-1]
    if labels is not None:
        if labels.shape != shape:
            raise ValueError(
                f"labels of shape {tuple(labels.shape)} do not match logits {tuple(logits.shape)}"
            )
        return labels != IGNORE_INDEX
    if attention_mask is not None and attention_mask.shape == shape:
        return attention_mask.bool()
    return torch.ones(shape, dtype=torch.bool, device=logits.device)


def _nll_sum(logits: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``sum_n sum_{valid t} -log p(y_nt | x_n)``: the sum of per-example losses."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -picked.masked_fill(~valid, 0.0).sum()


def _slice_example(inputs: Mapping[str, Any], n: int, num_examples: int) -> dict[str, Any]:
    return {
        k: v[n : n + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == num_examples else v
        for k, v in inputs.items()
    }


# --------------------------------------------------------------------------------------------------------------
# estimator
# --------------------------------------------------------------------------------------------------------------


def estimate_fisher(
    model: nn.Module,
    dataset: Iterable[Any],
    kind: Literal["diagonal", "kfac"] = "diagonal",
    fisher_type: Literal["true", "empirical"] = "true",
    num_samples: int | None = None,
    mc_samples: int = 1,
    batch_size: int = 16,
    data_collator: Callable[[list[Any]], Mapping[str, Any]] | None = None,
    label_key: str = "labels",
    show_progress: bool = True,
    distributed: bool | None = None,
    *,
    seed: int | None = None,
    shard: bool = True,
    collector: FisherCollector | None = None,
    process_group: Any = None,
    **kfac_kwargs: Any,
) -> Curvature:
    """Estimate the Fisher of ``model`` on ``dataset`` with exact per-example gradients.

    Args:
        model: a model whose output has ``logits`` (``[B, C]`` or ``[B, T, C]``); a DDP wrapper is unwrapped.
            Optional ``model.rows_per_example(inputs) -> int`` declares that the encoder sees ``r`` contiguous
            rows per example (dual encoders); otherwise it is inferred per layer as ``rows // B``.
        dataset: a ``datasets.Dataset``, a torch ``Dataset``, a list of dicts, or any iterable of examples.
        kind: ``"diagonal"`` (:class:`DiagonalFisher`) or ``"kfac"`` (``KFACCollector(**kfac_kwargs)``).
        fisher_type: ``"true"`` samples labels from the model (default, the Fisher proper); ``"empirical"``
            uses the gold labels.
        num_samples: use at most this many examples (the first ones; across all ranks when distributed).
        mc_samples: label draws per example for the true Fisher (ignored for empirical).
        batch_size: examples per forward.
        data_collator: defaults to ``transformers.default_data_collator``.
        label_key: column with the gold labels (``labels``/``label``/``label_ids`` are also recognised). Labels
            are never passed to the model; for the true Fisher they only mark ignored (-100) positions.
        show_progress: tqdm bar (rank 0 only).
        distributed: None = on when ``torch.distributed`` is initialised with world size > 1. When on, this rank
            takes examples ``i % world == rank`` (unless ``shard=False``: the dataset is already this rank's
            shard), and sums and counts are all-reduced: every rank returns the same Fisher.
        seed: seed for the label draws, per example (identical labels whatever the sharding); None uses the
            global RNG.
        collector: use this collector instead of the one ``kind`` names.
        process_group: the ``torch.distributed`` group to shard over and reduce across (None: the default group).
        **kfac_kwargs: passed to ``KFACCollector``.

    The model is put in eval mode (each module's mode restored afterwards), only parameters with
    ``requires_grad`` are covered, and the parameters' ``.grad`` are left untouched.
    """
    if fisher_type not in ("true", "empirical"):
        raise ValueError(f"fisher_type must be 'true' or 'empirical', got {fisher_type!r}")
    if mc_samples < 1:
        raise ValueError("mc_samples must be >= 1")
    if collector is None:
        if kind == "diagonal":
            if kfac_kwargs:
                raise TypeError(f"unexpected arguments for kind='diagonal': {sorted(kfac_kwargs)}")
            collector = DiagonalCollector()
        elif kind == "kfac":
            from .collectors.kfac import KFACCollector

            collector = KFACCollector(**kfac_kwargs)
        else:
            raise ValueError(f"kind must be 'diagonal' or 'kfac', got {kind!r}")
    n_draws = mc_samples if fisher_type == "true" else 1

    model = unwrap_model(model)
    rank, world = _dist_world(process_group)
    if distributed is None:
        distributed = world > 1
    elif distributed and world == 1:
        distributed = False
    if not distributed:
        rank, world = 0, 1
    shard_rank, shard_world = (rank, world) if shard else (0, 1)

    all_params = list(model.parameters())
    if not any(p.requires_grad for p in all_params):
        raise ValueError("the model has no trainable parameter")
    device = next(p for p in all_params if p.requires_grad).device
    collate = data_collator
    if collate is None:
        from transformers import default_data_collator as collate
    allowed = _forward_columns(model)

    examples, count = _example_stream(dataset, num_samples, shard_rank, shard_world)
    total_batches = None if count is None else -(-count // batch_size)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_batches,
        desc=f"Fisher ({type(collector).__name__}, {fisher_type})",
        disable=not show_progress or rank != 0,
        unit="batch",
    )

    modes = {m: m.training for m in model.modules()}
    saved_grads: dict[nn.Parameter, torch.Tensor | None] | None = None
    num_examples = 0
    model.eval()
    try:
        collector.attach(model)
        # after attach: a collector may switch requires_grad off for weights whose gradient it does not need
        trainable = [p for p in all_params if p.requires_grad]
        fallback = collector.fallback_params() if hasattr(collector, "fallback_params") else {}
        for indexed in _batches(examples, batch_size):
            indices = [i for i, _ in indexed]
            raw = [ex for _, ex in indexed]
            batch = dict(collate([_clean_example(ex, allowed, label_key) for ex in raw]))
            b = len(raw)
            labels = None
            for key in (label_key, *_LABEL_KEYS):
                if key in batch:
                    value = batch.pop(key)
                    labels = value if labels is None else labels
            inputs = _to_device(batch, device)
            labels = _to_device(labels, device)
            if fisher_type == "empirical" and labels is None:
                raise ValueError(f"empirical Fisher needs gold labels (column {label_key!r})")
            rows = int(model.rows_per_example(inputs)) if hasattr(model, "rows_per_example") else 1
            attention_mask = inputs.get("attention_mask")
            collector.begin_batch(b, rows, attention_mask)

            with torch.enable_grad():
                logits = _get_logits(model(**inputs))
                valid = _valid_mask(logits, labels, attention_mask)
                draws = (
                    [labels]
                    if fisher_type == "empirical"
                    else [_sample_labels(logits, seed, indices, d) for d in range(n_draws)]
                )
                targets = collector.grad_targets() if hasattr(collector, "grad_targets") else None
                if targets is None and saved_grads is None:
                    saved_grads = {p: p.grad for p in all_params}
                    for p in all_params:
                        p.grad = None
                for s, y in enumerate(draws):
                    retain = s < len(draws) - 1
                    loss = _nll_sum(logits, y, valid)
                    if targets is None:
                        torch.autograd.backward(loss, inputs=trainable or None, retain_graph=retain)
                        for p in trainable:
                            p.grad = None
                    elif targets:
                        torch.autograd.grad(loss, targets, retain_graph=retain, allow_unused=True)
                    collector.after_backward()
                del logits, loss
                if fallback:
                    _fallback_loop(model, collector, fallback, inputs, draws, valid, b)
            num_examples += b
            bar.update(1)
    finally:
        collector.detach()
        bar.close()
        for m, mode in modes.items():
            m.training = mode
        if saved_grads is not None:
            for p, g in saved_grads.items():
                p.grad = g

    sums = collector.sums()
    if distributed:
        import torch.distributed as dist

        for key in sorted(sums):
            dist.all_reduce(sums[key], op=dist.ReduceOp.SUM, group=process_group)
        n = torch.tensor([num_examples], dtype=torch.float64, device=device)
        dist.all_reduce(n, op=dist.ReduceOp.SUM, group=process_group)
        num_examples = int(n.item())
    return collector.finalize(sums, num_examples, n_draws)


def _fallback_loop(
    model: nn.Module,
    collector: Any,
    params: Mapping[str, nn.Parameter],
    inputs: Mapping[str, Any],
    draws: Sequence[torch.Tensor],
    valid: torch.Tensor,
    num_examples: int,
) -> None:
    """Exact per-example squared gradients for parameters without a hook rule: one example at a time."""
    names = list(params)
    plist = [params[n] for n in names]
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in plist]
    with capture_paused():
        for i in range(num_examples):
            logits = _get_logits(model(**_slice_example(inputs, i, num_examples)))
            for s, y in enumerate(draws):
                loss = _nll_sum(logits, y[i : i + 1], valid[i : i + 1])
                grads = torch.autograd.grad(loss, plist, retain_graph=s < len(draws) - 1, allow_unused=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a += g.float().square()
    for n, a in zip(names, acc):
        collector.add_fallback(n, a)
