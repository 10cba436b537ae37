"""Hard negatives re-mined from the model being trained (dense), mixed with the TF-IDF (sparse) ones.

The training examples start with the K-1 sparse hard negatives of :func:`~.data.build_training_examples`. As the
model learns, those stop being hard; :class:`HardNegativeMiner` re-encodes a pool of names with the current
model and gives each example its ``dense_negatives`` most similar non-gold names from that pool, filling the rest
of the K-1 slots with its sparse negatives in TF-IDF order. The pool is the union of every example's sparse
candidates (the first ``sparse_pool_depth`` of its ``sparse_negatives``) plus ``random_pool`` names sampled from the dictionary, so a re-mine
costs one encoder pass over a few names per example instead of the whole dictionary.

The new candidates reach training through the collator: :class:`~.data.DualEncoderCollator` with ``miner`` set
replaces the candidate tokens of an example it recognises (by its mention and gold-name tokens), so the
``datasets.Dataset`` stays immutable and examples of other tasks (replay) keep theirs.
:class:`RemineNegativesCallback` runs the re-mine every ``every_steps`` optimizer steps of a ``Trainer`` (or a
fraction of an epoch).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, TrainerCallback

from .dictionary import Dictionary

Key = tuple[tuple[int, ...], tuple[int, ...]]


def example_key(mention_input_ids: Sequence[int], gold_input_ids: Sequence[int]) -> Key:
    """Identity of a training example as the collator sees it: its mention tokens and its gold name's tokens."""
    return tuple(int(t) for t in mention_input_ids), tuple(int(t) for t in gold_input_ids)


class HardNegativeMiner:
    """Dense + sparse hard negatives for the examples of one training dataset, re-mined on demand.

    Args:
        train_dataset: examples from :func:`~.data.build_training_examples` (its ``query``, ``positive``,
            ``gold_names``, ``negatives`` and ``sparse_negatives`` columns: dictionary name indices).
        dictionary: the dictionary the examples were mined from (indices refer to its ``names``).
        tokenizer: tokenises the new candidate names (same ``max_length`` as the examples).
        dense_negatives: how many of the K-1 negatives come from the model (default: half, rounded up); the
            rest are the example's sparse negatives.
        random_pool: extra dictionary names sampled (seeded) into the pool, so the model can find negatives
            that share no character n-grams with any training mention.
        sparse_pool_depth: how many of each example's sparse candidates enter the pool (the pool size, hence
            the cost of a re-mine, grows with it).
    """

    def __init__(
        self,
        train_dataset: Dataset,
        dictionary: Dictionary,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = 25,
        dense_negatives: int | None = None,
        random_pool: int = 5000,
        sparse_pool_depth: int = 16,
        batch_size: int = 128,
        seed: int = 0,
        show_progress: bool = True,
    ) -> None:
        missing = {"query", "positive", "gold_names", "negatives", "sparse_negatives", "labels"} - set(
            train_dataset.column_names
        )
        if missing:
            raise ValueError(
                f"train_dataset lacks column(s) {sorted(missing)}: build it with build_training_examples"
            )
        self.dictionary = dictionary
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.num_candidates = len(train_dataset[0]["candidate_input_ids"])
        slots = self.num_candidates - 1
        self.dense_negatives = -(-slots // 2) if dense_negatives is None else int(dense_negatives)
        if not 0 <= self.dense_negatives <= slots:
            raise ValueError(f"dense_negatives must be in [0, {slots}] (K-1), got {dense_negatives}")
        self.queries: list[str] = list(train_dataset["query"])
        self.sparse: list[list[int]] = [list(r) for r in train_dataset["sparse_negatives"]]
        labels = list(train_dataset["labels"])
        golds = [list(g) for g in train_dataset["gold_names"]]
        self.positives: list[int] = list(train_dataset["positive"])
        self.keys: list[Key] = [
            example_key(m, c[label])
            for m, c, label in zip(
                train_dataset["mention_input_ids"], train_dataset["candidate_input_ids"], labels
            )
        ]
        self.labels = labels
        # names never to use as a negative for a key: the gold names of every example sharing the key
        self.excluded: dict[Key, set[int]] = {}
        for key, g in zip(self.keys, golds):
            self.excluded.setdefault(key, set()).update(g)
        pool = {i for row in self.sparse for i in row[:sparse_pool_depth]}
        rng = random.Random(seed)
        n_random = min(random_pool, len(dictionary))
        pool.update(rng.sample(range(len(dictionary)), n_random))
        self.pool = sorted(pool)
        #: each example's current negatives (dictionary indices); starts as the sparse ones it was built with
        self.negatives: list[list[int]] = [list(r) for r in train_dataset["negatives"]]
        self.overrides: dict[Key, tuple[list[list[int]], list[list[int]]]] = {}
        self.history: list[dict[str, float]] = []
        #: live summary (a dict the task statistics hold by reference, so results.json sees the final counts)
        self.report: dict[str, Any] = self.describe()

    def describe(self) -> dict[str, Any]:
        """What the miner does, for the task statistics and the model card."""
        return {
            "dense_negatives": self.dense_negatives,
            "sparse_negatives": self.num_candidates - 1 - self.dense_negatives,
            "pool_names": len(self.pool),
            "examples": len(self.queries),
            "remines": len(self.history),
            "remine_seconds": round(sum(r["seconds"] for r in self.history), 2),
            "new_dense_fraction_last": self.history[-1]["new_dense_fraction"] if self.history else None,
        }

    @torch.no_grad()
    def remine(self, model: torch.nn.Module) -> dict[str, float]:
        """Encode the pool and the queries with ``model`` and set every example's new candidates.

        Returns (and appends to ``history``) the seconds spent and the fraction of dense negatives that were
        not among the example's K-1 previous negatives.
        """
        t0 = time.perf_counter()
        model = getattr(model, "module", model)
        kwargs = {"batch_size": self.batch_size, "tokenizer": self.tokenizer, "max_length": self.max_length}
        names = [self.dictionary.names[i] for i in self.pool]
        name_emb = model.encode(names, show_progress=self.show_progress, desc="re-mine: pool", **kwargs)
        query_emb = model.encode(self.queries, show_progress=False, **kwargs)
        pool = torch.as_tensor(self.pool)
        depth = min(len(self.pool), self.dense_negatives + 64)
        k = self.num_candidates
        texts: list[str] = []
        changed = total = 0
        for lo in range(0, len(self.queries), 1024):
            scores = query_emb[lo : lo + 1024] @ name_emb.T
            top = pool[torch.topk(scores, depth, dim=1).indices].tolist()
            for row, ranked in enumerate(top, start=lo):
                excluded = self.excluded[self.keys[row]]
                dense = [i for i in ranked if i not in excluded][: self.dense_negatives]
                previous = set(self.negatives[row])
                changed += sum(i not in previous for i in dense)
                total += len(dense)
                sparse = [i for i in self.sparse[row] if i not in excluded and i not in dense]
                negatives = dense + sparse[: k - 1 - len(dense)]
                negatives += self._random_fill(negatives, excluded, row)
                self.negatives[row] = negatives
                row_texts = [self.dictionary.names[i] for i in negatives]
                row_texts.insert(self.labels[row], self.dictionary.names[self.positives[row]])
                texts.extend(row_texts)
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        for row, key in enumerate(self.keys):
            rows = slice(row * k, (row + 1) * k)
            self.overrides[key] = (enc["input_ids"][rows], enc["attention_mask"][rows])
        record = {
            "seconds": time.perf_counter() - t0,
            "new_dense_fraction": changed / total if total else 0.0,
        }
        self.history.append(record)
        self.report.update(self.describe())
        return record

    def _random_fill(self, negatives: list[int], excluded: set[int], row: int) -> list[int]:
        """Random dictionary names when the pool ran out (tiny dictionaries only)."""
        rng = random.Random(row)
        extra: list[int] = []
        while len(negatives) + len(extra) < self.num_candidates - 1:
            j = rng.randrange(len(self.dictionary))
            if j not in excluded and j not in negatives and j not in extra:
                extra.append(j)
        return extra

    def candidates_for(
        self, mention_input_ids: Sequence[int], gold_input_ids: Sequence[int]
    ) -> tuple[list[list[int]], list[list[int]]] | None:
        """The re-mined (input_ids, attention_mask) of an example's K candidates, or None if not re-mined."""
        if not self.overrides:
            return None
        return self.overrides.get(example_key(mention_input_ids, gold_input_ids))


class RemineNegativesCallback(TrainerCallback):
    """Re-mines ``miner``'s hard negatives every ``every_steps`` optimizer steps (not after the last one).

    ``every_steps`` below 1 is a fraction of an epoch (as for ``warmup_steps``), resolved when training starts:
    ``1/3`` re-mines after each third of an epoch. The resolved step count is in ``miner.report``. The collator
    reads the new candidates in the main process, so ``dataloader_num_workers`` must be 0.
    """

    def __init__(self, miner: HardNegativeMiner, every_steps: float) -> None:
        if not every_steps > 0:
            raise ValueError(f"every_steps must be > 0 (steps, or a fraction of an epoch), got {every_steps}")
        self.miner = miner
        self.every_steps = every_steps
        self._every = int(every_steps) if every_steps >= 1 else None
        miner.report["every_steps"] = self._every

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 - Trainer callback API
        if args.dataloader_num_workers:
            raise ValueError(
                "re-mining hard negatives needs dataloader_num_workers=0 (worker processes would keep "
                f"stale candidates), got {args.dataloader_num_workers}"
            )
        if self.every_steps < 1:
            per_epoch = state.max_steps / max(state.num_train_epochs, 1)
            self._every = max(1, math.ceil(self.every_steps * per_epoch - 1e-9))
            self.miner.report["every_steps"] = self._every

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
        if model is None or state.global_step % self._every or state.global_step >= state.max_steps:
            return
        self.miner.remine(model)
