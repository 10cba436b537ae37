"""Entity-linking tasks for the task stream: corpus declarations and :func:`build_entity_linking_task`.

A task = training examples from the train split + an evaluator on the dev or test split. A corpus is declared
by a mapping (PubTator splits, entity types, vocabulary file and format, id prefix rules) read by
:meth:`CorpusSpec.from_mapping`: the built-in :data:`TASK_REGISTRY` entries and the ``corpora:`` section of a
recipe go through that one function, so adding a corpus needs no Python.

Evaluation candidate set (DESIGN.md): ``"default"`` = every name of every gold id in any split of the
corpus plus a fixed-seed sample of 20,000 other dictionary names (encoding the full MeSH chemical
vocabulary takes ~20 min on CPU); ``"full"`` = the whole dictionary. Candidate names come from the
vocabulary file only; dev/test mention strings never enter training or the dictionary.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .abbrev import add_query_column
from .data import DualEncoderCollator, build_training_examples
from .dictionary import DICTIONARY_FORMATS, Dictionary, load_dictionary
from .evaluation import CombinedEvaluator, RetrievalEvaluator
from .mining import HardNegativeMiner, RemineNegativesCallback
from .pubtator import MESH_OMIM_ID_RULES, IdRules, load_pubtator_mentions
from .retriever import TfidfRetriever


@dataclass(frozen=True)
class DictionarySpec:
    """A concept vocabulary file (relative to the data dir, or absolute; gzipped or not) and how to read it.

    ``format``: ``medic`` (``ID[|ID]||name[|synonym]``), ``tsv`` (headed TSV; ``id_column``, ``name_column`` and
    ``synonym_column`` name its columns, ``synonym_column=None`` when it has none) or ``auto`` (by file name).
    """

    path: str
    format: Literal["auto", "medic", "tsv"] = "auto"
    id_column: str = "ChemicalID"
    name_column: str = "ChemicalName"
    synonym_column: str | None = "Synonyms"

    def is_tsv(self) -> bool:
        if self.format == "auto":
            return ".tsv" in [s.lower() for s in Path(self.path).suffixes]
        return self.format == "tsv"

    def load(self, id_rules: IdRules) -> Dictionary:
        """Read the file (prefer :func:`cached_dictionary`, which reads it once per process)."""
        if not self.is_tsv():
            return load_dictionary(self.path, format="medic", id_rules=id_rules)
        columns = {"id_column": self.id_column, "name_column": self.name_column}
        return load_dictionary(
            self.path, format="tsv", id_rules=id_rules, synonym_column=self.synonym_column, **columns
        )


@dataclass(frozen=True)
class CorpusSpec:
    """A declared corpus: where a task's data lives, which entity types it links, to which vocabulary.

    Paths are relative to the data dir (or absolute). ``types`` filters the PubTator type column (None: every
    type); ``entity_type`` is what the task links, in words ("disease", "species"), for model cards and result
    tables; ``id_rules`` turn the ids of both the corpus and the vocabulary into one canonical form.
    """

    train: str
    dev: str
    test: str
    dictionary: DictionarySpec
    types: tuple[str, ...] | None = None
    entity_type: str = "entity"
    description: str = ""
    id_rules: IdRules = MESH_OMIM_ID_RULES

    #: keys of a corpus mapping (registry entry or recipe ``corpora:`` entry)
    KEYS = ("train", "dev", "test", "dictionary", "types", "entity_type", "description", "id_prefixes")
    DICTIONARY_KEYS = ("path", "format", "id_column", "name_column", "synonym_column")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "corpus") -> CorpusSpec:
        """Validate and read one corpus declaration (the one code path of registry entries and recipe corpora).

        ``values``: ``train``/``dev``/``test`` (paths), ``dictionary`` (a path, or a mapping with ``path``,
        ``format`` and the TSV column names), ``types`` (a type name or list; absent: every type),
        ``entity_type``, ``description``, ``id_prefixes`` (``{written prefix: canonical prefix}``, key ``""`` for
        bare numbers; absent: the MeSH/OMIM rule). Raises ``ValueError`` naming ``source`` and the key.
        """
        if not isinstance(values, Mapping):
            raise ValueError(f"{source}: a corpus is a mapping of {', '.join(cls.KEYS)}, got {values!r}")
        unknown = sorted(set(values) - set(cls.KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(cls.KEYS)}")
        missing = [k for k in ("train", "dev", "test", "dictionary") if not values.get(k)]
        if missing:
            raise ValueError(f"{source}: missing {', '.join(missing)}")
        for key in ("train", "dev", "test", "entity_type", "description"):
            if key in values and not isinstance(values[key], str):
                raise ValueError(f"{source}.{key}: expected a string, got {values[key]!r}")
        dictionary = values["dictionary"]
        if isinstance(dictionary, str):
            dictionary = {"path": dictionary}
        if not isinstance(dictionary, Mapping):
            raise ValueError(f"{source}.dictionary: expected a path or a mapping, got {dictionary!r}")
        bad = sorted(set(dictionary) - set(cls.DICTIONARY_KEYS))
        if bad:
            raise ValueError(
                f"{source}.dictionary: unknown key(s) {', '.join(bad)}; known: {', '.join(cls.DICTIONARY_KEYS)}"
            )
        if not isinstance(dictionary.get("path"), str) or not dictionary["path"]:
            raise ValueError(
                f"{source}.dictionary.path: expected a file path, got {dictionary.get('path')!r}"
            )
        fmt = dictionary.get("format", "auto")
        if fmt not in DICTIONARY_FORMATS:
            raise ValueError(
                f"{source}.dictionary.format: one of {', '.join(DICTIONARY_FORMATS)}, got {fmt!r}"
            )
        for key in ("id_column", "name_column", "synonym_column"):
            value = dictionary.get(key)
            if (
                key in dictionary
                and not (isinstance(value, str) and value)
                and not (key == "synonym_column" and value is None)
            ):
                raise ValueError(f"{source}.dictionary.{key}: expected a column name, got {value!r}")
        types = values.get("types")
        if isinstance(types, str):
            types = [types]
        if types is not None and (
            not isinstance(types, list | tuple)
            or not types
            or not all(isinstance(t, str) and t for t in types)
        ):
            raise ValueError(
                f"{source}.types: expected a type name or a non-empty list of them, got {types!r}"
            )
        prefixes = values.get("id_prefixes")
        if prefixes is None:
            id_rules = MESH_OMIM_ID_RULES
        elif not isinstance(prefixes, Mapping):
            raise ValueError(
                f"{source}.id_prefixes: expected {{written prefix: canonical prefix}}, got {prefixes!r}"
            )
        else:
            try:
                id_rules = IdRules.from_mapping(prefixes)
            except ValueError as err:
                raise ValueError(f"{source}.id_prefixes: {err}") from None
        return cls(
            train=values["train"],
            dev=values["dev"],
            test=values["test"],
            dictionary=DictionarySpec(**{"format": fmt, **dictionary}),
            types=None if types is None else tuple(types),
            entity_type=values.get("entity_type", "entity"),
            description=values.get("description", ""),
            id_rules=id_rules,
        )

    def to_mapping(self) -> dict[str, Any]:
        """The declaration as :meth:`from_mapping` reads it (JSON-ready; written into results)."""
        return {
            "train": self.train,
            "dev": self.dev,
            "test": self.test,
            "dictionary": {k: getattr(self.dictionary, k) for k in self.DICTIONARY_KEYS},
            "types": None if self.types is None else list(self.types),
            "entity_type": self.entity_type,
            "description": self.description,
            "id_prefixes": self.id_rules.as_mapping(),
        }


MEDIC = "medic/medic_06Jul2012.txt"
BUILTIN_CORPORA: dict[str, dict[str, Any]] = {
    "ncbi-disease": {
        "train": "ncbi_disease/NCBItrainset_corpus.txt",
        "dev": "ncbi_disease/NCBIdevelopset_corpus.txt",
        "test": "ncbi_disease/NCBItestset_corpus.txt",
        "dictionary": MEDIC,
        "entity_type": "disease",
        "description": "NCBI-disease (all mention types) linked to MEDIC 2012",
    },
    "bc5cdr-disease": {
        "train": "bc5cdr/CDR_TrainingSet.PubTator.txt",
        "dev": "bc5cdr/CDR_DevelopmentSet.PubTator.txt",
        "test": "bc5cdr/CDR_TestSet.PubTator.txt",
        "dictionary": MEDIC,
        "types": ["Disease"],
        "entity_type": "disease",
        "description": "BC5CDR Disease mentions linked to MEDIC 2012",
    },
    "bc5cdr-chemical": {
        "train": "bc5cdr/CDR_TrainingSet.PubTator.txt",
        "dev": "bc5cdr/CDR_DevelopmentSet.PubTator.txt",
        "test": "bc5cdr/CDR_TestSet.PubTator.txt",
        "dictionary": {"path": "mesh_chemicals/mesh_chemicals.tsv.gz", "format": "tsv"},
        "types": ["Chemical"],
        "entity_type": "chemical",
        "description": "BC5CDR Chemical mentions linked to MeSH chemicals (D branch + SCRs)",
    },
    "s800-species": {
        "train": "s800/S800_train.PubTator",
        "dev": "s800/S800_dev.PubTator",
        "test": "s800/S800_test.PubTator",
        # the taxonomy table uses the MeSH chemical file's column names (ChemicalID = taxid): see its SOURCES.txt
        "dictionary": {"path": "ncbi_taxonomy/ncbi_taxonomy.tsv.gz", "format": "tsv"},
        "types": ["Species"],
        "entity_type": "species",
        "id_prefixes": {"NCBITaxon:": "NCBITaxon:", "taxon:": "NCBITaxon:", "": "NCBITaxon:"},
        "description": "S800 species mentions linked to NCBI Taxonomy (2024-09 names + ids retired since 2021-03)",
    },
}

#: the built-in corpora, declared as a recipe's ``corpora:`` section would declare them
TASK_REGISTRY: dict[str, CorpusSpec] = {
    name: CorpusSpec.from_mapping(values, source=f"TASK_REGISTRY[{name!r}]")
    for name, values in BUILTIN_CORPORA.items()
}


def resolve_corpus(name: str, corpora: Mapping[str, CorpusSpec] | None = None) -> CorpusSpec:
    """The declaration of task ``name``: from ``corpora`` (a recipe's) first, then :data:`TASK_REGISTRY`."""
    if corpora and name in corpora:
        return corpora[name]
    if name in TASK_REGISTRY:
        return TASK_REGISTRY[name]
    known = sorted(set(TASK_REGISTRY) | set(corpora or {}))
    raise KeyError(f"unknown entity-linking task {name!r}; known: {known}")


def default_data_dir() -> Path:
    """``$HF_CONTINUAL_DATA`` if set, else ``../shared/data`` next to the repository."""
    env = os.environ.get("HF_CONTINUAL_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[4] / "shared" / "data"


@lru_cache(maxsize=4)
def _cached_dictionary(spec: DictionarySpec, mtime_ns: int, id_rules: IdRules) -> Dictionary:
    return spec.load(id_rules)


def _resolved(path: str | Path, spec: DictionarySpec | None) -> tuple[DictionarySpec, int]:
    resolved = Path(path).resolve()
    spec = DictionarySpec(str(resolved)) if spec is None else replace(spec, path=str(resolved))
    return spec, resolved.stat().st_mtime_ns


def cached_dictionary(
    path: str | Path, spec: DictionarySpec | None = None, id_rules: IdRules = MESH_OMIM_ID_RULES
) -> Dictionary:
    """The vocabulary at ``path`` (read as ``spec`` says; default: format by file name, the default TSV columns)
    memoised per (file, modification time, format, columns, id rules): a vocabulary is read once per process
    however many tasks, splits or runs use it. Treat the result as read-only."""
    return _cached_dictionary(*_resolved(path, spec), id_rules)


@lru_cache(maxsize=4)
def _cached_retriever(spec: DictionarySpec, mtime_ns: int, id_rules: IdRules) -> TfidfRetriever:
    return TfidfRetriever(_cached_dictionary(spec, mtime_ns, id_rules).names)


def cached_retriever(
    path: str | Path, spec: DictionarySpec | None = None, id_rules: IdRules = MESH_OMIM_ID_RULES
) -> TfidfRetriever:
    """The char-3-gram TF-IDF index over the names of :func:`cached_dictionary` (same key): built once per process."""
    return _cached_retriever(*_resolved(path, spec), id_rules)


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
    corpora: Mapping[str, CorpusSpec] | None = None,
) -> EntityLinkingTask:
    """Build the task ``name`` (a key of ``corpora``, e.g. a recipe's ``corpora:`` section, or of
    :data:`TASK_REGISTRY`) from the files under ``data_dir``.

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
    spec = resolve_corpus(name, corpora)
    if split not in ("test", "dev"):
        raise ValueError(f"split must be 'test' or 'dev', got {split!r}")
    if eval_candidates not in ("default", "full", "both"):
        raise ValueError(f"eval_candidates must be 'default', 'full' or 'both', got {eval_candidates!r}")
    if remine_every_steps is not None and not remine_every_steps > 0:
        raise ValueError(
            f"remine_every_steps must be > 0 (steps, or a fraction of an epoch below 1), got {remine_every_steps}"
        )
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    dict_path = root / spec.dictionary.path
    dictionary = cached_dictionary(dict_path, spec.dictionary, spec.id_rules)

    stats: dict[str, Any] = {
        "task": name,
        "entity_type": spec.entity_type,
        "description": spec.description,
        "dictionary": spec.dictionary.path,
    }
    stats["dictionary_names"], stats["dictionary_ids"] = len(dictionary), dictionary.num_ids
    splits: dict[str, Dataset] = {}
    all_gold: set[str] = set()
    for split_name in ("train", "dev", "test"):
        mentions, raw = load_pubtator_mentions(
            root / getattr(spec, split_name), types=spec.types, id_rules=spec.id_rules
        )
        all_gold.update(i for ids in mentions["ids"] for i in ids)
        if split_name == "train" or split_name == split:
            limit = max_train_mentions if split_name == "train" else max_eval_mentions
            mentions = _sample(mentions, limit, seed)
            mentions, expanded = add_query_column(mentions, expand_abbreviations)
            splits[split_name] = mentions
        else:
            expanded = 0
        stats[split_name] = _split_stats(raw, mentions, dictionary, expanded)

    retriever = cached_retriever(dict_path, spec.dictionary, spec.id_rules)
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
