"""Training examples for the dual encoder: a mention with K candidate names and the index of the gold one.

The gold name is the name of a gold id closest to the mention (char-3-gram TF-IDF cosine); the K-1 hard
negatives are the retriever's top names that carry none of the gold ids (random names fill up if too few
remain). Only training mentions and dictionary names are used: dev/test mention strings never enter.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .dictionary import Dictionary, normalize_name
from .retriever import TfidfRetriever

if TYPE_CHECKING:
    from .mining import HardNegativeMiner

TENSOR_COLUMNS = (
    "mention_input_ids",
    "mention_attention_mask",
    "candidate_input_ids",
    "candidate_attention_mask",
    "labels",
)


def build_training_examples(
    mentions: Dataset,
    dictionary: Dictionary,
    tokenizer: PreTrainedTokenizerBase,
    retriever: TfidfRetriever | None = None,
    num_candidates: int = 8,
    max_length: int = 25,
    shuffle_candidates: bool = False,
    dedupe: bool = True,
    query_column: str = "query",
    seed: int = 0,
) -> tuple[Dataset, dict[str, int]]:
    """Tokenised training examples from a mention dataset (columns ``ids`` and ``query_column``).

    Mentions none of whose gold ids is in ``dictionary`` cannot be trained on and are skipped (counted as
    ``skipped_unlinkable`` for ``-1`` and ``skipped_not_in_dictionary`` otherwise). With ``dedupe``, repeated
    (normalised text, gold ids) pairs give one example. The gold name is candidate 0 unless
    ``shuffle_candidates`` (then ``labels`` holds its position). Returns the dataset (columns
    :data:`TENSOR_COLUMNS` plus ``query``/``candidates`` texts, and the dictionary indices that
    :class:`~.mining.HardNegativeMiner` re-mines from: ``positive``, ``gold_names`` (all names of the gold ids),
    ``negatives`` and ``sparse_negatives`` (the retriever's ranked non-gold names)) and counts.
    """
    if num_candidates < 2:
        raise ValueError("num_candidates must be >= 2 (the gold name and at least one negative)")
    if len(dictionary) < num_candidates:
        raise ValueError(
            f"dictionary has {len(dictionary)} names, fewer than num_candidates={num_candidates}"
        )
    retriever = retriever or TfidfRetriever(dictionary.names)
    if retriever.names != dictionary.names:
        raise ValueError("retriever must be built over dictionary.names")
    stats = {"train_mentions": len(mentions), "skipped_unlinkable": 0, "skipped_not_in_dictionary": 0}
    queries: list[str] = []
    golds: list[list[str]] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for text, ids in zip(mentions[query_column], mentions["ids"]):
        if not ids:
            stats["skipped_unlinkable"] += 1
            continue
        known = [g for g in ids if g in dictionary]
        if not known:
            stats["skipped_not_in_dictionary"] += 1
            continue
        query = normalize_name(text)
        key = (query, tuple(sorted(ids)))
        if dedupe and key in seen:
            continue
        seen.add(key)
        queries.append(query)
        golds.append(known)
    stats["examples"] = len(queries)
    if not queries:
        raise ValueError("no trainable mention: every mention is unlinkable or outside the dictionary")

    rng = random.Random(seed)
    depth = min(len(dictionary), 4 * num_candidates + 16)
    top, _ = retriever.topk(queries, depth)
    q_vecs = retriever.transform(queries)
    texts_per_example: list[list[str]] = []
    labels: list[int] = []
    mined: dict[str, list] = {"positive": [], "gold_names": [], "negatives": [], "sparse_negatives": []}
    short_of_hard = 0
    for row, (gold_ids, ranked) in enumerate(zip(golds, top)):
        gold_names = sorted({i for g in gold_ids for i in dictionary.id_to_names[g]})
        sims = (retriever.matrix[gold_names] @ q_vecs[row].T).toarray().ravel()
        positive = gold_names[int(np.argmax(sims))]
        excluded = set(gold_names)
        negatives = [int(i) for i in ranked if int(i) not in excluded][: num_candidates - 1]
        if len(negatives) < num_candidates - 1:
            short_of_hard += 1
            while len(negatives) < num_candidates - 1:
                j = rng.randrange(len(dictionary))
                if j not in excluded and j not in negatives:
                    negatives.append(j)
        mined["positive"].append(positive)
        mined["gold_names"].append(gold_names)
        mined["negatives"].append(negatives)
        mined["sparse_negatives"].append([int(i) for i in ranked if int(i) not in excluded])
        candidates = [positive, *negatives]
        label = 0
        if shuffle_candidates:
            rng.shuffle(candidates)
            label = candidates.index(positive)
        texts_per_example.append([dictionary.names[i] for i in candidates])
        labels.append(label)
    stats["examples_with_random_negatives"] = short_of_hard

    mention_enc = tokenizer(queries, truncation=True, max_length=max_length)
    flat = [t for texts in texts_per_example for t in texts]
    cand_enc = tokenizer(flat, truncation=True, max_length=max_length)
    k = num_candidates

    def regroup(values: Sequence[list[int]]) -> list[list[list[int]]]:
        return [list(values[i * k : (i + 1) * k]) for i in range(len(queries))]

    dataset = Dataset.from_dict(
        {
            "mention_input_ids": mention_enc["input_ids"],
            "mention_attention_mask": mention_enc["attention_mask"],
            "candidate_input_ids": regroup(cand_enc["input_ids"]),
            "candidate_attention_mask": regroup(cand_enc["attention_mask"]),
            "labels": labels,
            "query": queries,
            "candidates": texts_per_example,
            **mined,
        }
    )
    return dataset, stats


@dataclass
class DualEncoderCollator:
    """Pads a list of training examples to tensors: mentions [B, L], candidates [B, K, L], labels [B].

    Mentions and candidates share one length L (the longest sequence in the batch, optionally rounded up
    to ``pad_to_multiple_of``) so that the model can stack them into one encoder batch. Keys other than
    :data:`TENSOR_COLUMNS` are ignored. With ``miner`` set, an example the miner has re-mined gets its current
    candidates instead of the ones stored in the dataset (see :mod:`.mining`).
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None
    miner: HardNegativeMiner | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if self.miner is not None:
            features = [self._remined(f) for f in features]
        k = len(features[0]["candidate_input_ids"])
        if any(len(f["candidate_input_ids"]) != k for f in features):
            raise ValueError("all examples of a batch need the same number of candidates")
        length = max(
            max(len(f["mention_input_ids"]) for f in features),
            max(len(c) for f in features for c in f["candidate_input_ids"]),
        )
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        m_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        m_mask = torch.zeros((batch, length), dtype=torch.long)
        c_ids = torch.full((batch, k, length), self.pad_token_id, dtype=torch.long)
        c_mask = torch.zeros((batch, k, length), dtype=torch.long)
        for b, f in enumerate(features):
            n = len(f["mention_input_ids"])
            m_ids[b, :n] = torch.as_tensor(f["mention_input_ids"])
            m_mask[b, :n] = torch.as_tensor(f["mention_attention_mask"])
            for j, (ids, mask) in enumerate(zip(f["candidate_input_ids"], f["candidate_attention_mask"])):
                c_ids[b, j, : len(ids)] = torch.as_tensor(ids)
                c_mask[b, j, : len(mask)] = torch.as_tensor(mask)
        out = {
            "mention_input_ids": m_ids,
            "mention_attention_mask": m_mask,
            "candidate_input_ids": c_ids,
            "candidate_attention_mask": c_mask,
        }
        if "labels" in features[0]:
            out["labels"] = torch.as_tensor([int(f["labels"]) for f in features], dtype=torch.long)
        return out

    def _remined(self, feature: dict) -> dict:
        if "labels" not in feature:
            return feature
        gold = feature["candidate_input_ids"][int(feature["labels"])]
        found = self.miner.candidates_for(feature["mention_input_ids"], gold)
        if found is None:
            return feature
        return {**feature, "candidate_input_ids": found[0], "candidate_attention_mask": found[1]}
