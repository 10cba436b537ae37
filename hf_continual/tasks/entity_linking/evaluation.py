"""Entity-linking evaluation: acc@k of nearest-name retrieval over a candidate dictionary.

A mention is correct at k when one of the first k distinct concepts among its ranked names carries a gold
id. A "concept" is the id set of a name (names shared by several records carry the union), so synonyms
of one concept take one rank only. Gold id sets are compared leniently: for a composite mention any gold
atom counts. Mentions without a gold id (``-1``) or whose gold ids are all outside the dictionary stay in
the denominator as errors and are reported (``unlinkable``, ``not_in_dictionary``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from .dictionary import Dictionary
from .retriever import TfidfRetriever


def accuracy_at_k(
    ranked: Iterable[Sequence[int]],
    name_ids: Sequence[Sequence[str]],
    gold: Sequence[Iterable[str]],
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """acc@k for ranked name indices (best first) per mention; returns ``acc@k`` fractions and ``correct@k``."""
    ks = sorted(ks)
    correct = dict.fromkeys(ks, 0)
    total = 0
    for order, gold_ids in zip(ranked, gold):
        total += 1
        gold_set = set(gold_ids)
        seen: set[frozenset[str]] = set()
        hit_rank = None
        for i in order:
            concept = frozenset(name_ids[int(i)])
            if concept in seen:
                continue
            seen.add(concept)
            if gold_set & concept:
                hit_rank = len(seen)
                break
            if len(seen) >= ks[-1]:
                break
        for k in ks:
            correct[k] += hit_rank is not None and hit_rank <= k
    out: dict[str, float] = {}
    for k in ks:
        out[f"acc@{k}"] = correct[k] / total if total else 0.0
        out[f"correct@{k}"] = float(correct[k])
    return out


def encode_across_ranks(model: torch.nn.Module, texts: Sequence[str], **kwargs: Any) -> torch.Tensor:
    """``model.encode(texts, **kwargs)``, the work split across the processes of a distributed run.

    Every rank encodes every ``world``-th text (a strided share: similar lengths on every rank) and the shares
    are all-gathered, so each rank ends with the same [N, H] float32 CPU tensor at 1/world of the encoding
    time. One process (or no process group): a plain ``encode``.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model.encode(texts, **kwargs)
    world, rank = dist.get_world_size(), dist.get_rank()
    n = len(texts)
    share = model.encode(list(texts[rank::world]), **kwargs)
    per = -(-n // world)  # the largest share; shorter ones are zero-padded for all_gather
    # NCCL gathers device tensors only; gloo gathers CPU tensors
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    padded = torch.zeros(per, share.shape[1], dtype=share.dtype, device=device)
    padded[: share.shape[0]] = share.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    out = torch.empty(n, share.shape[1], dtype=share.dtype)
    for r, part in enumerate(gathered):
        count = len(range(r, n, world))
        out[r::world] = part[:count].cpu()
    return out


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (names, shapes, bytes): equal iff the model state is equal."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class RetrievalEvaluator:
    """acc@1 / acc@5 of a :class:`~.model.DualEncoderModel` (or the TF-IDF baseline) on fixed mentions.

    ``queries`` are the mention texts to link (already abbreviation-expanded if wanted), ``gold`` their
    gold id lists, ``candidates`` the dictionary searched. Name and mention embeddings are cached per model
    state (key: :func:`model_fingerprint`), so evaluating an unchanged model again does not re-encode;
    at most ``cache_size`` states are kept.
    """

    def __init__(
        self,
        queries: Sequence[str],
        gold: Sequence[Sequence[str]],
        candidates: Dictionary,
        tokenizer: PreTrainedTokenizerBase | None = None,
        full_dictionary: bool = False,
        ks: Sequence[int] = (1, 5),
        batch_size: int = 128,
        max_length: int | None = None,
        top_names: int = 64,
        cache_size: int = 2,
        show_progress: bool = True,
    ) -> None:
        self.queries = list(queries)
        self.gold = [list(g) for g in gold]
        self.candidates = candidates
        self.tokenizer = tokenizer
        self.full_dictionary = full_dictionary
        self.ks = tuple(ks)
        self.batch_size = batch_size
        self.max_length = max_length
        self.top_names = top_names
        self.cache_size = cache_size
        self.show_progress = show_progress
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.encode_calls = 0
        self.unlinkable = sum(not g for g in self.gold)
        self.not_in_dictionary = sum(bool(g) and not candidates.linkable(g) for g in self.gold)

    def _counts(self) -> dict[str, float]:
        return {
            "mentions": float(len(self.queries)),
            "unlinkable": float(self.unlinkable),
            "not_in_dictionary": float(self.not_in_dictionary),
            "candidate_names": float(len(self.candidates)),
            "candidate_set_full": float(self.full_dictionary),
        }

    def _finish(self, ranked: Iterable[Sequence[int]]) -> dict[str, float]:
        """Scores of ranked name indices through the packaged ``entity_linking_accuracy`` evaluate module."""
        from ...metrics import load_evaluate_module

        name_ids = self.candidates.name_ids
        result = load_evaluate_module("entity_linking_accuracy").compute(
            predictions=[[list(name_ids[int(i)]) for i in order] for order in ranked],
            references=self.gold,
            k=list(self.ks),
        )
        linkable = len(self.queries) - self.unlinkable - self.not_in_dictionary
        for k in self.ks:
            result[f"acc@{k}_linkable"] = result[f"correct@{k}"] / linkable if linkable else 0.0
        result.update(self._counts())
        return result

    def embeddings(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(mention embeddings [Q, H], candidate-name embeddings [N, H]) for the model's current state."""
        key = f"{model_fingerprint(model)}:{self.max_length}"
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        kwargs = {"batch_size": self.batch_size, "tokenizer": self.tokenizer, "max_length": self.max_length}
        names = encode_across_ranks(
            model, self.candidates.names, show_progress=self.show_progress, desc="dictionary", **kwargs
        )
        mentions = encode_across_ranks(
            model, self.queries, show_progress=self.show_progress, desc="mentions", **kwargs
        )
        self.encode_calls += 1
        self._cache[key] = (mentions, names)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return mentions, names

    def rank(self, mention_emb: torch.Tensor, name_emb: torch.Tensor, block: int = 1024) -> np.ndarray:
        """Indices [Q, top_names] of the most similar names per mention (cosine; best first)."""
        k = min(self.top_names, name_emb.shape[0])
        out = np.zeros((mention_emb.shape[0], k), dtype=np.int64)
        for lo in range(0, mention_emb.shape[0], block):
            scores = mention_emb[lo : lo + block] @ name_emb.T
            out[lo : lo + block] = torch.topk(scores, k, dim=1).indices.numpy()
        return out

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """acc@k (fractions), ``correct@k``, ``acc@k_linkable`` and the counts for ``model``."""
        mention_emb, name_emb = self.embeddings(model)
        return self._finish(self.rank(mention_emb, name_emb))

    def evaluate_tfidf(self, retriever: TfidfRetriever | None = None) -> dict[str, float]:
        """The same metrics for the char-3-gram TF-IDF baseline over the same candidate names."""
        from .dictionary import normalize_name

        retriever = retriever or TfidfRetriever(self.candidates.names)
        ranked, _ = retriever.topk([normalize_name(q) for q in self.queries], self.top_names)
        return self._finish(ranked)


class CombinedEvaluator:
    """Several evaluators of the same mentions (e.g. the default candidate set and the full dictionary).

    ``evaluate(model)`` merges their results, each under its prefix (``""`` for the primary one, e.g.
    ``"full/"`` for the full dictionary: ``full/acc@1``, ``full/not_in_dictionary``...).
    """

    def __init__(self, evaluators: dict[str, RetrievalEvaluator]) -> None:
        if "" not in evaluators:
            raise ValueError("one evaluator must have the empty prefix (the primary metrics)")
        self.evaluators = dict(evaluators)

    @property
    def primary(self) -> RetrievalEvaluator:
        return self.evaluators[""]

    def _merged(self, score: Callable[[RetrievalEvaluator], dict[str, float]]) -> dict[str, float]:
        return {prefix + k: v for prefix, ev in self.evaluators.items() for k, v in score(ev).items()}

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return self._merged(lambda ev: ev.evaluate(model))

    def evaluate_tfidf(self) -> dict[str, float]:
        return self._merged(RetrievalEvaluator.evaluate_tfidf)
