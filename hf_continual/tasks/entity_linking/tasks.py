"""Entity-linking tasks for the task stream: a registry of corpora and :func:`build_entity_linking_task`.

A task = training examples from the train split + an evaluator on the dev or test split. Adding a corpus
is one :data:`TASK_REGISTRY` entry (PubTator files, entity types, vocabulary file); no code changes.

Evaluation candidate set (DESIGN.md): ``"default"`` = every name of every gold id in any split of the
corpus plus a fixed-seed sample of 20,000 other dictionary names (encoding the full MeSH chemical
vocabulary takes ~20 min on CPU); ``"full"`` = the whole dictionary. Candidate names come from the
vocabulary file only; dev/test mention strings never enter training or the dictionary.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .abbrev import add_query_column
from .data import DualEncoderCollator, build_training_examples
from .dictionary import Dictionary, load_dictionary
from .evaluation import CombinedEvaluator, RetrievalEvaluator
from .mining import HardNegativeMiner, RemineNegativesCallback
from .pubtator import load_pubtator_mentions
from .retriever import TfidfRetriever


@dataclass(frozen=True)
class CorpusSpec:
    """Where a task's data lives (paths relative to the data dir) and which entity types it links."""

    train: str
    dev: str
    test: str
    dictionary: str
    types: tuple[str, ...] | None = None
    description: str = ""


TASK_REGISTRY: dict[str, CorpusSpec] = {
    "ncbi-disease": CorpusSpec(
        train="ncbi_disease/NCBItrainset_corpus.txt",
        dev="ncbi_disease/NCBIdevelopset_corpus.txt",
        test="ncbi_disease/NCBItestset_corpus.txt",
        dictionary="medic/medic_06Jul2012.txt",
        types=None,
        description="NCBI-disease (all mention types) linked to MEDIC 2012",
    ),
    "bc5cdr-disease": CorpusSpec(
        train="bc5cdr/CDR_TrainingSet.PubTator.txt",
        dev="bc5cdr/CDR_DevelopmentSet.PubTator.txt",
        test="bc5cdr/CDR_TestSet.PubTator.txt",
        dictionary="medic/medic_06Jul2012.txt",
        types=("Disease",),
        description="BC5CDR Disease mentions linked to MEDIC 2012",
    ),
    "bc5cdr-chemical": CorpusSpec(
        train="bc5cdr/CDR_TrainingSet.PubTator.txt",
        dev="bc5cdr/CDR_DevelopmentSet.PubTator.txt",
        test="bc5cdr/CDR_TestSet.PubTator.txt",
        dictionary="mesh_chemicals/mesh_chemicals.tsv.gz",
        types=("Chemical",),
        description="BC5CDR Chemical mentions linked to MeSH chemicals (D branch + SCRs)",
    ),
}


def default_data_dir() -> Path:
    """``$HF_CONTINUAL_DATA`` if set, else ``../shared/data`` next to the repository."""
    env = os.environ.get("HF_CONTINUAL_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[4] / "shared" / "data"


@lru_cache(maxsize=4)
def _cached_dictionary(path: str, mtime_ns: int) -> Dictionary:
    return load_dictionary(path)


def cached_dictionary(path: str | Path) -> Dictionary:
    """:func:`load_dictionary` memoised per (path, modification time); treat the result as read-only."""
    path = Path(path).resolve()
    return _cached_dictionary(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=4)
def _cached_retriever(path: str, mtime_ns: int) -> TfidfRetriever:
    return TfidfRetriever(_cached_dictionary(path, mtime_ns).names)


def _split_stats(
    raw: dict[str, int], mentions: Dataset, dictionary: Dictionary, expanded: int
) -> dict[str, int]:
    ids = mentions["ids"]
    return {
        "documents": raw["documents"],
        "duplicate_documents": raw["duplicate_documents"],
        "entity_lines": raw["entity_lines"],
        "mentions": len(mentions),
        "composite": sum(len(i) > 1 for i in ids),
        "unlinkable": sum(not i for i in ids),
        "not_in_dictionary": sum(bool(i) and not dictionary.linkable(i) for i in ids),
        "abbreviations_expanded": expanded,
    }


def _sample(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """A fixed-seed sample of ``limit`` rows kept in corpus order (all rows when ``limit`` is None)."""
    if limit is None or limit >= len(dataset):
        return dataset
    rows = sorted(random.Random(seed).sample(range(len(dataset)), limit))
    return dataset.select(rows)


@dataclass
class EntityLinkingTask:
    """One entity-linking task of a stream (same attributes as ``hf_continual.stream.Task``).

    ``evaluate(model)`` returns ``acc@1``/``acc@5`` (fractions in [0, 1]) and counts; ``stats`` holds the
    per-split corpus statistics, training-example counts and the candidate set description.
    """

    name: str
    train_dataset: Dataset
    data_collator: DualEncoderCollator
    evaluator: RetrievalEvaluator | CombinedEvaluator
    dictionary: Dictionary
    eval_mentions: Dataset
    stats: dict[str, Any] = field(default_factory=dict)
    primary_metric: str = "acc@1"
    #: Trainer callbacks the stream activates while this task trains (hard-negative re-mining)
    callbacks: list[Any] = field(default_factory=list)

    @property
    def info(self) -> dict[str, Any]:
        """Alias of ``stats`` (the stream's ``Task.info``)."""
        return self.stats

    @property
    def evaluate(self) -> Callable[[torch.nn.Module], dict[str, float]]:
        """``evaluate(model) -> dict[str, float]``: acc@k of nearest-name retrieval (embeddings cached per model state)."""
        return self.evaluator.evaluate

    def evaluate_tfidf(self) -> dict[str, float]:
        """The char-3-gram TF-IDF baseline on the same mentions and candidate set."""
        return self.evaluator.evaluate_tfidf()


def training_name_pairs(train: Dataset, short_forms: bool = False) -> tuple[list[tuple[str, list[str]]], int]:
    """(name, gold ids) pairs that dictionary augmentation adds: every training query, plus (``short_forms``) the
    short form of every expanded training mention whose short form carries a single id set across the training
    split.

    A short form defined in its own document is linked through its long form, so the query alone would never put
    "CsA" in the dictionary; the same short form used undefined in another document (dev or test) then has no
    name to match. Short forms seen with different ids in training ("T": testosterone, triamcinolone) are left
    out. Returns the pairs and the number of short-form pairs among them.
    """
    from .dictionary import normalize_name

    pairs = [(q, list(ids)) for q, ids in zip(train["query"], train["ids"])]
    if not short_forms:
        return pairs, 0
    senses: dict[str, set[tuple[str, ...]]] = {}
    for mention, ids in zip(train["mention"], train["ids"]):
        senses.setdefault(normalize_name(mention), set()).add(tuple(sorted(ids)))
    short = [
        (m, list(ids))
        for m, q, ids in zip(train["mention"], train["query"], train["ids"])
        if q != m and len(senses[normalize_name(m)]) == 1
    ]
    return pairs + short, len(short)


def build_entity_linking_task(
    name: str,
    data_dir: str | Path | None,
    tokenizer: PreTrainedTokenizerBase,
    split: Literal["test", "dev"] = "test",
    max_train_mentions: int | None = None,
    max_eval_mentions: int | None = None,
    num_candidates: int = 8,
    eval_candidates: Literal["default", "full", "both"] = "default",
    seed: int = 0,
    expand_abbreviations: bool = False,
    num_other_candidates: int = 20_000,
    max_length: int = 25,
    shuffle_candidates: bool = False,
    eval_batch_size: int = 128,
    show_progress: bool = True,
    candidate_gold: Literal["all_splits", "evaluated"] = "all_splits",
    augment_dictionary: bool = False,
    augment_short_forms: bool = False,
    remine_every_steps: float | None = None,
    remine_dense_negatives: int | None = None,
    remine_random_pool: int = 5000,
) -> EntityLinkingTask:
    """Build the task ``name`` (a :data:`TASK_REGISTRY` key) from the files under ``data_dir``.

    Training examples come from the train split (a fixed-seed sample of ``max_train_mentions`` mentions if
    given), each with ``num_candidates`` names whose hard negatives are mined from the full dictionary.
    Evaluation is on ``split`` (``max_eval_mentions`` sampled likewise) over the ``eval_candidates`` set.
    ``candidate_gold="evaluated"`` builds the default candidate set from the gold ids of the evaluated mentions
    only (instead of every split's): fewer names to encode, for quick runs such as ``make demo``.
    With ``expand_abbreviations`` a mention that is a short form defined in its document is replaced by
    the long form, for training and evaluation alike. With ``augment_dictionary`` the searched candidate set
    also holds the texts of the training mentions (the sampled ones this task trains on; never dev or test
    mentions) as names of their gold ids (with ``augment_short_forms``, also the unambiguous short forms of the
    expanded ones: :func:`training_name_pairs`); the hard negatives are still mined from the dictionary alone.
    ``eval_candidates="both"`` reports the default set's metrics and the full dictionary's under ``full/``.

    With ``remine_every_steps`` (optimizer steps, or a fraction of an epoch below 1) the task carries a
    :class:`~.mining.RemineNegativesCallback`: on that schedule, ``remine_dense_negatives`` (default half) of
    each example's K-1 negatives are replaced by the names the current model ranks highest among a pool (16
    sparse candidates per example plus ``remine_random_pool`` sampled dictionary names); the others stay TF-IDF.
    """
    if name not in TASK_REGISTRY:
        raise KeyError(f"unknown entity-linking task {name!r}; known: {sorted(TASK_REGISTRY)}")
    if split not in ("test", "dev"):
        raise ValueError(f"split must be 'test' or 'dev', got {split!r}")
    if eval_candidates not in ("default", "full", "both"):
        raise ValueError(f"eval_candidates must be 'default', 'full' or 'both', got {eval_candidates!r}")
    if remine_every_steps is not None and not remine_every_steps > 0:
        raise ValueError(
            f"remine_every_steps must be > 0 (steps, or a fraction of an epoch below 1), got {remine_every_steps}"
        )
    spec = TASK_REGISTRY[name]
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    dict_path = (root / spec.dictionary).resolve()
    dictionary = cached_dictionary(dict_path)

    stats: dict[str, Any] = {
        "task": name,
        "description": spec.description,
        "dictionary": str(spec.dictionary),
    }
    stats["dictionary_names"], stats["dictionary_ids"] = len(dictionary), dictionary.num_ids
    splits: dict[str, Dataset] = {}
    all_gold: set[str] = set()
    for split_name in ("train", "dev", "test"):
        mentions, raw = load_pubtator_mentions(root / getattr(spec, split_name), types=spec.types)
        all_gold.update(i for ids in mentions["ids"] for i in ids)
        if split_name == "train" or split_name == split:
            limit = max_train_mentions if split_name == "train" else max_eval_mentions
            mentions = _sample(mentions, limit, seed)
            mentions, expanded = add_query_column(mentions, expand_abbreviations)
            splits[split_name] = mentions
        else:
            expanded = 0
        stats[split_name] = _split_stats(raw, mentions, dictionary, expanded)

    retriever = _cached_retriever(str(dict_path), dict_path.stat().st_mtime_ns)
    train_dataset, train_stats = build_training_examples(
        splits["train"],
        dictionary,
        tokenizer,
        retriever=retriever,
        num_candidates=num_candidates,
        max_length=max_length,
        shuffle_candidates=shuffle_candidates,
        seed=seed,
    )
    stats["training"] = train_stats
    miner, callbacks = None, []
    if remine_every_steps is not None:
        miner = HardNegativeMiner(
            train_dataset,
            dictionary,
            tokenizer,
            max_length=max_length,
            dense_negatives=remine_dense_negatives,
            random_pool=remine_random_pool,
            batch_size=eval_batch_size,
            seed=seed,
            show_progress=show_progress,
        )
        train_stats["remining"] = miner.report
        callbacks.append(RemineNegativesCallback(miner, remine_every_steps))

    if eval_candidates == "full":
        candidates = dictionary
        description = f"full dictionary ({len(dictionary)} names)"
    else:
        if candidate_gold not in ("all_splits", "evaluated"):
            raise ValueError(f"candidate_gold must be 'all_splits' or 'evaluated', got {candidate_gold!r}")
        gold = all_gold
        where = "train+dev+test"
        if candidate_gold == "evaluated":
            gold = {i for ids in splits[split]["ids"] for i in ids}
            where = f"the {len(splits[split])} evaluated {split} mentions"
        candidates = dictionary.candidate_set(gold, num_other=num_other_candidates, seed=seed)
        description = (
            f"default: all names of the {sum(g in dictionary for g in gold)} gold ids of {where} "
            f"+ {num_other_candidates} other names sampled with seed {seed} ({len(candidates)} names)"
        )

    def with_training_names(names: Dictionary) -> tuple[Dictionary, dict[str, int]]:
        pairs, short_forms = training_name_pairs(splits["train"], augment_short_forms)
        out, counts = names.augmented(pairs, source=f"{names.source} + training mention names")
        return out, counts | {"short_forms": short_forms}

    if augment_dictionary:
        candidates, counts = with_training_names(candidates)
        stats["dictionary_augmentation"] = counts
        description += (
            f"; augmented with {counts['added']} training mention names ("
            + (
                f"of which {counts['short_forms']} short forms of expanded abbreviations; "
                if augment_short_forms
                else ""
            )
            + f"{counts['new_names']} new names, {len(candidates)} names in all)"
        )
    stats["candidate_set"] = description
    stats["expand_abbreviations"] = expand_abbreviations
    stats["augment_dictionary"] = augment_dictionary
    stats["evaluated_split"] = split
    eval_mentions = splits[split]

    def retrieval(names: Dictionary, full: bool) -> RetrievalEvaluator:
        return RetrievalEvaluator(
            eval_mentions["query"],
            eval_mentions["ids"],
            names,
            tokenizer=tokenizer,
            full_dictionary=full,
            batch_size=eval_batch_size,
            max_length=max_length,
            show_progress=show_progress,
        )

    evaluator: RetrievalEvaluator | CombinedEvaluator = retrieval(candidates, eval_candidates == "full")
    if eval_candidates == "both":
        full = with_training_names(dictionary)[0] if augment_dictionary else dictionary
        evaluator = CombinedEvaluator({"": evaluator, "full/": retrieval(full, True)})
        stats["full_candidate_set"] = f"full dictionary ({len(full)} names)"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return EntityLinkingTask(
        name=name,
        train_dataset=train_dataset,
        data_collator=DualEncoderCollator(pad_token_id=pad_id, miner=miner),
        evaluator=evaluator,
        dictionary=dictionary,
        eval_mentions=eval_mentions,
        stats=stats,
        callbacks=callbacks,
    )
