"""Self-alignment pretraining (SapBERT, Liu et al., NAACL 2021) of a BERT encoder on concept vocabularies.

Pairs of names of the same concept are drawn from dictionaries only (the vocabularies the tasks link to, read
with :func:`~.dictionary.load_dictionary`); corpus mentions never enter. Each batch holds ``B`` pairs
``(name_a, name_b)`` with their concept label; both sides are encoded with the dual encoder's mean pooling
(:meth:`~.model.DualEncoderModel.embed`) and the ``2B`` embeddings with their labels go to a
multi-similarity loss whose pairs are chosen by a miner (``pytorch-metric-learning``): every name has its
pair mate as a positive in the batch, every other concept's names are negatives.

Training is a plain HF ``Trainer`` run (checkpoints, resume, progress bar); the result is a standard BERT
directory (weights, tokenizer, model card) that ``model:`` in any recipe can name. With ``continual_state`` the
alignment is also consolidated as task 0 (:func:`save_alignment_state`): its curvature and anchor are saved
beside the weights for ``ContinualTrainer.load_continual_state``.

Recipe (``hf-continual pretrain RECIPE.yaml``)::

    name: pretrain-medic
    model: minilm                  # packaged all-MiniLM-L6-v2, a Hub id or a local BERT directory
    data_dir: ../shared/data       # relative to the recipe file when it does not exist as given
    vocabularies:                  # task names (their dictionary) or dictionary files under data_dir
      - {source: ncbi-disease, pairs_per_concept: 20, max_pairs: null}
    seed: 0
    max_length: 25
    loss: {miner: triplet_margin, miner_margin: 0.2, alpha: 2.0, beta: 50.0, base: 0.5}
    training: {learning_rate: 2.0e-5, per_device_train_batch_size: 128, num_train_epochs: 1, save_steps: 100}
    keep_snapshots: true           # at each checkpoint also write OUTPUT/snapshots/step-N (a BERT directory)
    save_every_minutes: 10         # also checkpoint every 10 minutes of wall time (null: save_steps only)
    continual_state: {method: kfac, num_examples: 1024, num_candidates: 8}   # task 0 (or null: none)
    output_dir: outputs/pretrain
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import itertools
import json
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch.utils.data import SequentialSampler
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import ModelOutput

from ...recipe import RecipeError
from .dictionary import Dictionary, normalize_name
from .model import DualEncoderModel

PRETRAIN_KEYS = {
    "name",
    "description",
    "model",
    "num_hidden_layers",
    "data_dir",
    "vocabularies",
    "seed",
    "max_length",
    "loss",
    "training",
    "keep_snapshots",
    "save_every_minutes",
    "continual_state",
    "output_dir",
}
CONTINUAL_STATE_DEFAULTS: dict[str, Any] = {"method": "kfac", "num_examples": 1024, "num_candidates": 8}
STATE_METHODS = ("ewc", "online_ewc", "kfac")
ALIGNMENT_TASK = "self-alignment"
VOCABULARY_KEYS = {"source", "pairs_per_concept", "max_pairs"}
LOSS_DEFAULTS: dict[str, Any] = {
    # SapBERT paper (appendix): multi-similarity loss alpha 2, beta 50, lambda (base) 0.5; miner margin 0.2
    "miner": "triplet_margin",
    "miner_margin": 0.2,
    "alpha": 2.0,
    "beta": 50.0,
    "base": 0.5,
}
MINERS = ("triplet_margin", "multi_similarity", "none")
TRAINING_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-5,
    "per_device_train_batch_size": 128,
    "num_train_epochs": 1,
    "weight_decay": 0.01,
    "lr_scheduler_type": "constant",
    "save_steps": 100,
    "logging_steps": 10,
    "report_to": "none",
}
CHECKPOINTS = "checkpoints"
SNAPSHOTS = "snapshots"
PAIRS_FILE = "pairs.tsv.gz"
INFO_FILE = "pretrain_info.json"
LOSS_PLOT = "loss_curve.png"


# ---------------------------------------------------------------------------------------------- pairs
def concept_names(dictionary: Dictionary) -> list[tuple[tuple[str, ...], list[str]]]:
    """(ids, unique normalised names) of every concept record, in file order.

    A concept is a record's id tuple (a MEDIC line, a MeSH row); its names are the record's names after
    :func:`normalize_name` (the normalisation the dual encoder applies to every text), duplicates removed.
    """
    grouped: dict[tuple[str, ...], dict[str, None]] = {}
    for entry in dictionary.entries:
        norm = normalize_name(entry.name)
        if norm:
            grouped.setdefault(entry.ids, {})[norm] = None
    return [(ids, list(names)) for ids, names in grouped.items()]


def _pair_indices(n: int, cap: int | None, rng: random.Random) -> list[tuple[int, int]]:
    """All ``i < j`` index pairs of ``n`` names, or a uniform sample of ``cap`` of them (sorted)."""
    total = n * (n - 1) // 2
    if cap is None or total <= cap:
        return list(itertools.combinations(range(n), 2))
    if total <= 4 * cap:
        return sorted(rng.sample(list(itertools.combinations(range(n), 2)), cap))
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < cap:
        i, j = rng.sample(range(n), 2)
        chosen.add((min(i, j), max(i, j)))
    return sorted(chosen)


def synonym_pairs(
    dictionary: Dictionary,
    pairs_per_concept: int | None = 20,
    seed: int = 0,
    max_pairs: int | None = None,
    label_offset: int = 0,
) -> tuple[list[tuple[str, str, int]], dict[str, Any]]:
    """Synonym pairs ``(name_a, name_b, label)`` of one vocabulary, shuffled with ``seed``.

    Every concept with at least two distinct names contributes all its name pairs, or a seeded sample of
    ``pairs_per_concept`` of them (SapBERT: at most 50); ``max_pairs`` then keeps a seeded sample of the whole
    list (a CPU budget). Labels number the concepts from ``label_offset`` in file order. Returns the pairs and
    counts (concepts, concepts with pairs, pairs before and after ``max_pairs``).
    """
    if pairs_per_concept is not None and pairs_per_concept < 1:
        raise ValueError(f"pairs_per_concept must be >= 1 or None, got {pairs_per_concept}")
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1 or None, got {max_pairs}")
    rng = random.Random(seed)
    concepts = concept_names(dictionary)
    pairs: list[tuple[str, str, int]] = []
    with_pairs = 0
    for label, (_, names) in enumerate(concepts, start=label_offset):
        chosen = _pair_indices(len(names), pairs_per_concept, rng)
        with_pairs += bool(chosen)
        pairs.extend((names[i], names[j], label) for i, j in chosen)
    before = len(pairs)
    if max_pairs is not None and max_pairs < len(pairs):
        pairs = [pairs[i] for i in sorted(rng.sample(range(len(pairs)), max_pairs))]
    rng.shuffle(pairs)
    stats = {
        "source": dictionary.source,
        "concepts": len(concepts),
        "concepts_with_pairs": with_pairs,
        "single_name_concepts": len(concepts) - with_pairs,
        "names": sum(len(n) for _, n in concepts),
        "pairs_per_concept": pairs_per_concept,
        "pairs_before_max": before,
        "max_pairs": max_pairs,
        "pairs": len(pairs),
        "labels": [label_offset, label_offset + len(concepts)],
    }
    return pairs, stats


def _pairs_tsv(pairs: Sequence[tuple[str, str, int]]) -> Iterator[str]:
    yield "name_a\tname_b\tlabel\n"
    for a, b, label in pairs:
        yield f"{a}\t{b}\t{label}\n"


def pairs_digest(pairs: Sequence[tuple[str, str, int]]) -> str:
    """sha256 of the pairs' TSV text: the same pairs give the same digest on any machine (a gzip file's bytes
    depend on the zlib build), so a model's pairs can be checked against a rebuild from its recipe."""
    h = hashlib.sha256()
    for line in _pairs_tsv(pairs):
        h.update(line.encode("utf-8"))
    return h.hexdigest()


def write_pairs(path: str | os.PathLike, pairs: Sequence[tuple[str, str, int]]) -> str:
    """Write the pairs as gzipped TSV (``name_a``, ``name_b``, ``label``) atomically; returns its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
        for line in _pairs_tsv(pairs):
            gz.write(line.encode("utf-8"))
    os.replace(tmp, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


class PairCollator:
    """Tokenises a batch of pairs into ``2B`` rows (all ``name_a`` then all ``name_b``) with doubled labels."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int = 25) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts = [r["name_a"] for r in rows] + [r["name_b"] for r in rows]
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        labels = torch.tensor([int(r["label"]) for r in rows] * 2, dtype=torch.long)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


# ---------------------------------------------------------------------------------------------- model
class SelfAlignmentLoss:
    """Multi-similarity loss on the batch embeddings, with the pairs chosen by a ``pytorch-metric-learning``
    miner: ``triplet_margin`` (SapBERT: all triplets that violate ``miner_margin``), ``multi_similarity``
    (the MS paper's pair miner, ``epsilon = miner_margin``) or ``none`` (every pair)."""

    def __init__(
        self,
        miner: str = "triplet_margin",
        miner_margin: float = 0.2,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
    ) -> None:
        from pytorch_metric_learning import losses, miners

        if miner not in MINERS:
            raise ValueError(f"loss.miner must be one of {MINERS}, got {miner!r}")
        self.loss = losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)
        if miner == "triplet_margin":
            self.miner = miners.TripletMarginMiner(margin=miner_margin, type_of_triplets="all")
        elif miner == "multi_similarity":
            self.miner = miners.MultiSimilarityMiner(epsilon=miner_margin)
        else:
            self.miner = None

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pairs = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss(embeddings, labels, pairs)


class SelfAlignmentModel(DualEncoderModel):
    """The dual encoder with a ``forward`` for name rows: mean-pooled embeddings and the alignment loss.

    Same config and weights as :class:`DualEncoderModel` (a checkpoint loads with either class); the loss
    function is attached with :meth:`set_loss` and is not part of the state.
    """

    def set_loss(self, loss_fn: SelfAlignmentLoss) -> None:
        object.__setattr__(self, "_alignment_loss", loss_fn)

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
    ) -> ModelOutput:
        """Embeddings [N, H] of N name rows and, with ``labels``, the alignment loss. No ``**kwargs``: the
        Trainer divides the loss by the accumulation steps itself."""
        emb = self.embed(input_ids, attention_mask)
        loss = None
        if labels is not None:
            loss_fn = getattr(self, "_alignment_loss", None)
            if loss_fn is None:
                raise RuntimeError("SelfAlignmentModel.forward with labels needs set_loss() first")
            loss = loss_fn(emb, labels.to(emb.device))
        return ModelOutput(loss=loss, embeddings=emb)


def alignment_model(
    name_or_path: str, num_hidden_layers: int | None = None, max_length: int = 25
) -> SelfAlignmentModel:
    """A :class:`SelfAlignmentModel` initialised from a BERT checkpoint (as :meth:`DualEncoderModel.from_base`)."""
    base = DualEncoderModel.from_base(
        name_or_path, num_hidden_layers=num_hidden_layers, max_length=max_length
    )
    model = SelfAlignmentModel(base.config)
    model.load_state_dict(base.state_dict())
    model.tokenizer = base.tokenizer
    return model


# ---------------------------------------------------------------------------------------------- trainer
class _AlignmentTrainer(Trainer):
    """Pairs are pre-shuffled (seeded, vocabulary blocks in recipe order): read them in order."""

    def _get_train_sampler(self, train_dataset=None) -> SequentialSampler:
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


class ElapsedTime(TrainerCallback, ExportableState):
    """Training wall time summed over resumed sessions (saved in every checkpoint's trainer state)."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = float(seconds)
        self._start = time.perf_counter()

    def total(self) -> float:
        return self.seconds + time.perf_counter() - self._start

    def state(self) -> dict[str, Any]:
        return {"args": {"seconds": self.total()}, "attributes": {}}


def save_encoder(
    model: DualEncoderModel, directory: str | os.PathLike, extra: dict[str, Any] | None = None
) -> None:
    """Write the model's BERT encoder and tokenizer as a standard BERT directory (what ``model:`` in a recipe
    and :meth:`DualEncoderModel.from_base` read), atomically: into a temporary folder, then renamed."""
    from ...state import atomic_write_json

    dest = Path(directory)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    encoder = model.encoder
    encoder.config.architectures = ["BertModel"]
    encoder.save_pretrained(tmp)
    model.get_tokenizer().save_pretrained(tmp)
    if extra is not None:
        atomic_write_json(tmp / "snapshot_info.json", extra)
    if dest.exists():
        for f in tmp.iterdir():
            os.replace(f, dest / f.name)
        tmp.rmdir()
    else:
        os.replace(tmp, dest)


class SaveEveryMinutes(TrainerCallback):
    """Also checkpoint whenever ``minutes`` of wall time have passed since the last checkpoint (or the start of
    this session): on a shared CPU the time per step varies too much for ``save_steps`` alone to bound the work
    a killed run loses."""

    def __init__(self, minutes: float, clock=time.monotonic) -> None:
        self.seconds = 60.0 * minutes
        self.clock = clock
        self.last = clock()

    def on_step_end(self, args, state, control, **kwargs):
        if self.clock() - self.last >= self.seconds:
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.last = self.clock()


class SaveAtSteps(TrainerCallback):
    """Also checkpoint at the given global steps: :func:`vocabulary_end_steps` puts one where each vocabulary's
    block of pairs ends, so a snapshot holds the model aligned on the first vocabularies only."""

    def __init__(self, steps: Sequence[int]) -> None:
        self.steps = frozenset(int(s) for s in steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_save = True
        return control


def vocabulary_end_steps(block_sizes: Sequence[int], pairs_per_step: int) -> list[int]:
    """For pair blocks read in order (one per vocabulary), the last optimizer step made only of pairs of the
    blocks up to and including each one: ``floor(cumulative pairs / pairs_per_step)`` (0s dropped)."""
    ends, total = [], 0
    for size in block_sizes:
        total += int(size)
        step = total // pairs_per_step
        if step > 0 and step not in ends:
            ends.append(step)
    return ends


def _pairs_seen(state: Any, pairs_per_step: int, num_pairs: int | None) -> int:
    """Pairs trained on after ``state.global_step`` steps (an epoch's short last batch counted as it is)."""
    by_steps = state.global_step * pairs_per_step
    if num_pairs is None:
        return by_steps
    return min(by_steps, round((state.epoch or 0) * num_pairs))


class SnapshotCallback(TrainerCallback):
    """At each checkpoint, also write the encoder as a BERT directory ``snapshots/step-N`` (weights and
    tokenizer only: a recipe's ``model:`` can name it), so checkpoint rotation does not lose the learning curve."""

    def __init__(
        self, directory: str | os.PathLike, pairs_per_step: int, num_pairs: int | None = None
    ) -> None:
        self.directory = Path(directory)
        self.pairs_per_step = pairs_per_step
        self.num_pairs = num_pairs  # pairs per epoch: an epoch's last batch can be short (see _pairs_seen)
        self.handler: Any = None  # the trainer's callback handler (to read the ElapsedTime in use)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        callbacks = self.handler.callbacks if self.handler is not None else []
        timer = next((c for c in callbacks if isinstance(c, ElapsedTime)), None)
        extra = {
            "step": state.global_step,
            "pairs_seen": _pairs_seen(state, self.pairs_per_step, self.num_pairs),
            "epoch": state.epoch,
        }
        if timer is not None:
            extra["train_seconds"] = timer.total()
        save_encoder(model, self.directory / f"step-{state.global_step:07d}", extra)


# ---------------------------------------------------------------------------------------------- recipe
class PretrainRecipeError(RecipeError):
    """A pretraining recipe that cannot run (a :class:`RecipeError`: the CLI exits with code 2)."""


@dataclass
class VocabularySpec:
    """One vocabulary of a recipe: ``source`` as written (a task name or a file), the resolved file, how to read
    it (a task's own :class:`~.tasks.DictionarySpec` and id rules; for a file: format by file name, MeSH/OMIM
    ids) and its pair budget."""

    source: str
    path: Path
    pairs_per_concept: int | None = 20
    max_pairs: int | None = None
    reader: Any = None  #: DictionarySpec (None: the defaults)
    id_rules: Any = None  #: IdRules (None: MeSH/OMIM)

    def load(self) -> Dictionary:
        """The vocabulary, read once per process (:func:`~.tasks.cached_dictionary`)."""
        from .pubtator import MESH_OMIM_ID_RULES
        from .tasks import cached_dictionary

        return cached_dictionary(self.path, self.reader, self.id_rules or MESH_OMIM_ID_RULES)


@dataclass
class PretrainRecipe:
    """A validated pretraining recipe (see the module docstring)."""

    source: str
    name: str
    model: str
    vocabularies: list[VocabularySpec]
    output_dir: str
    seed: int = 0
    max_length: int = 25
    num_hidden_layers: int | None = None
    loss: dict[str, Any] = field(default_factory=lambda: dict(LOSS_DEFAULTS))
    training: dict[str, Any] = field(default_factory=lambda: dict(TRAINING_DEFAULTS))
    keep_snapshots: bool = True
    save_every_minutes: float | None = None
    description: str = ""
    continual_state: dict[str, Any] | None = None

    def training_arguments(self, **extra: Any) -> TrainingArguments:
        values = {
            **self.training,
            "output_dir": str(Path(self.output_dir) / CHECKPOINTS),
            "seed": self.seed,
            "remove_unused_columns": False,
            "save_strategy": "steps",
            "restore_callback_states_from_checkpoint": True,  # the ElapsedTime total
            **extra,
        }
        try:
            return TrainingArguments(**values)
        except (TypeError, ValueError) as err:
            raise PretrainRecipeError(f"{self.source}: training: {err}") from err

    def resolved(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "num_hidden_layers": self.num_hidden_layers,
            "vocabularies": [
                {
                    "source": v.source,
                    "path": str(v.path),
                    "pairs_per_concept": v.pairs_per_concept,
                    "max_pairs": v.max_pairs,
                }
                for v in self.vocabularies
            ],
            "seed": self.seed,
            "max_length": self.max_length,
            "loss": self.loss,
            "training": self.training,
            "keep_snapshots": self.keep_snapshots,
            "save_every_minutes": self.save_every_minutes,
            "continual_state": self.continual_state,
            "output_dir": self.output_dir,
        }


def _set_override(values: dict[str, Any], item: str) -> None:
    from ...config import load_yaml

    if "=" not in item:
        raise PretrainRecipeError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    value = load_yaml(raw) if raw != "" else ""
    if "." in key:
        section, sub = key.split(".", 1)
        if section not in ("training", "loss"):
            raise PretrainRecipeError(f"--set {key}: only training.* and loss.* take dotted keys")
        values.setdefault(section, {})[sub] = value
    elif key in PRETRAIN_KEYS:
        values[key] = value
    else:
        values.setdefault("training", {})[key] = value


def _vocabulary_source(source: str, data_dir: Path, recipe: Path) -> tuple[Path, Any, Any]:
    """(file, DictionarySpec or None, IdRules or None) of a vocabulary given as a task name or a file."""
    from .tasks import TASK_REGISTRY

    reader = id_rules = None
    if source in TASK_REGISTRY:
        spec = TASK_REGISTRY[source]
        reader, id_rules = spec.dictionary, spec.id_rules
        path = Path(spec.dictionary.path)
    else:
        path = Path(source)
    if not path.is_absolute():
        path = data_dir / path
    if not path.is_file():
        raise PretrainRecipeError(f"{recipe}: vocabulary {source!r}: file {str(path)!r} not found")
    return path.resolve(), reader, id_rules


def _optional_positive_int(recipe: Path, key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PretrainRecipeError(f"{recipe}: {key} must be a positive integer or null, got {value!r}")
    return value


def load_pretrain_recipe(
    path: str | os.PathLike, overrides: Sequence[str] = (), output_dir: str | None = None
) -> PretrainRecipe:
    """Read and validate a pretraining recipe; every problem is a :class:`PretrainRecipeError` naming the file
    and key. ``overrides`` are ``key=value`` (bare keys: top-level keys, else ``training`` fields)."""
    import yaml

    from ...config import load_yaml
    from .tasks import default_data_dir

    path = Path(path)
    if not path.is_file():
        raise PretrainRecipeError(f"{path}: recipe file not found")
    try:
        values = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise PretrainRecipeError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(values, dict):
        raise PretrainRecipeError(f"{path}: a recipe is a YAML mapping, got {type(values).__name__}")
    values = copy.deepcopy(values)
    for item in overrides:
        _set_override(values, item)
    if output_dir is not None:
        values["output_dir"] = output_dir
    unknown = sorted(set(values) - PRETRAIN_KEYS)
    if unknown:
        raise PretrainRecipeError(
            f"{path}: unknown key(s): {', '.join(unknown)}; known: {', '.join(sorted(PRETRAIN_KEYS))}"
        )
    raw_dir = values.get("data_dir")
    data_dir = Path(raw_dir) if raw_dir else default_data_dir()
    if not data_dir.is_absolute() and not data_dir.exists():
        data_dir = (path.parent / data_dir).resolve()
    vocabularies_raw = values.get("vocabularies")
    if not vocabularies_raw or not isinstance(vocabularies_raw, list):
        raise PretrainRecipeError(f"{path}: 'vocabularies' must be a non-empty list")
    vocabularies = []
    for i, item in enumerate(vocabularies_raw):
        item = {"source": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or "source" not in item:
            raise PretrainRecipeError(f"{path}: vocabularies[{i}] needs a 'source' (task name or file)")
        bad = sorted(set(item) - VOCABULARY_KEYS)
        if bad:
            raise PretrainRecipeError(
                f"{path}: vocabularies[{i}]: unknown key(s) {bad}; known {sorted(VOCABULARY_KEYS)}"
            )
        vocab_path, reader, id_rules = _vocabulary_source(str(item["source"]), data_dir, path)
        vocabularies.append(
            VocabularySpec(
                source=str(item["source"]),
                path=vocab_path,
                reader=reader,
                id_rules=id_rules,
                pairs_per_concept=_optional_positive_int(
                    path, f"vocabularies[{i}].pairs_per_concept", item.get("pairs_per_concept", 20)
                ),
                max_pairs=_optional_positive_int(path, f"vocabularies[{i}].max_pairs", item.get("max_pairs")),
            )
        )
    loss = {**LOSS_DEFAULTS, **(values.get("loss") or {})}
    bad = sorted(set(loss) - set(LOSS_DEFAULTS))
    if bad:
        raise PretrainRecipeError(f"{path}: loss: unknown key(s) {bad}; known {sorted(LOSS_DEFAULTS)}")
    if loss["miner"] not in MINERS:
        raise PretrainRecipeError(f"{path}: loss.miner must be one of {MINERS}, got {loss['miner']!r}")
    state = values.get("continual_state")
    if state is not None:
        if not isinstance(state, dict):
            raise PretrainRecipeError(f"{path}: continual_state must be a mapping or null")
        state = {**CONTINUAL_STATE_DEFAULTS, **state}
        bad = sorted(set(state) - set(CONTINUAL_STATE_DEFAULTS))
        if bad:
            raise PretrainRecipeError(
                f"{path}: continual_state: unknown key(s) {bad}; known {sorted(CONTINUAL_STATE_DEFAULTS)}"
            )
        if state["method"] not in STATE_METHODS:
            raise PretrainRecipeError(
                f"{path}: continual_state.method must be one of {STATE_METHODS}, got {state['method']!r}"
            )
        for key in ("num_examples", "num_candidates"):
            _optional_positive_int(path, f"continual_state.{key}", state[key])
    every = values.get("save_every_minutes")
    if every is not None and (isinstance(every, bool) or not isinstance(every, (int, float)) or every < 0):
        raise PretrainRecipeError(f"{path}: save_every_minutes must be a number >= 0 or null, got {every!r}")
    recipe = PretrainRecipe(
        source=str(path),
        name=str(values.get("name") or path.stem),
        description=str(values.get("description") or ""),
        model=str(values.get("model", "minilm")),
        num_hidden_layers=_optional_positive_int(path, "num_hidden_layers", values.get("num_hidden_layers")),
        vocabularies=vocabularies,
        output_dir=str(values.get("output_dir") or f"outputs/{path.stem}"),
        seed=int(values.get("seed", 0)),
        max_length=int(values.get("max_length", 25)),
        loss=loss,
        training={**TRAINING_DEFAULTS, **(values.get("training") or {})},
        keep_snapshots=bool(values.get("keep_snapshots", True)),
        continual_state=state,
        save_every_minutes=None if every is None else float(every),
    )
    recipe.training_arguments()  # validate the training section before any data is read
    return recipe


# ---------------------------------------------------------------------------------------------- run
def build_pairs(recipe: PretrainRecipe) -> tuple[Dataset, dict[str, Any]]:
    """The training pairs of a recipe: each vocabulary's shuffled pairs, vocabularies in recipe order, labels
    disjoint across vocabularies (seed: ``recipe.seed``, offset per vocabulary)."""
    columns: dict[str, list] = {"name_a": [], "name_b": [], "label": [], "ids": [], "vocabulary": []}
    stats = []
    offset = 0
    for k, vocab in enumerate(recipe.vocabularies):
        dictionary = vocab.load()
        pairs, s = synonym_pairs(
            dictionary,
            vocab.pairs_per_concept,
            seed=recipe.seed + k,
            max_pairs=vocab.max_pairs,
            label_offset=offset,
        )
        concept_ids = [ids for ids, _ in concept_names(dictionary)]
        for a, b, label in pairs:
            columns["name_a"].append(a)
            columns["name_b"].append(b)
            columns["label"].append(label)
            columns["ids"].append(list(concept_ids[label - offset]))
            columns["vocabulary"].append(k)
        offset = s["labels"][1]
        stats.append({"vocabulary": vocab.source, **s})
    return Dataset.from_dict(columns), {"vocabularies": stats, "pairs": len(columns["label"])}


def _loss_curve(log_history: list[dict[str, Any]], pairs_per_step: int) -> list[dict[str, float]]:
    return [
        {"step": h["step"], "pairs_seen": h["step"] * pairs_per_step, "loss": h["loss"]}
        for h in log_history
        if "loss" in h and "step" in h
    ]


def _plot_loss(curve: list[dict[str, float]], path: Path) -> None:
    if not curve:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([c["pairs_seen"] for c in curve], [c["loss"] for c in curve])
    ax.set_xlabel("pairs seen")
    ax.set_ylabel("multi-similarity loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name("tmp-" + path.name)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _state_line(info: dict[str, Any]) -> str:
    cs = info.get("continual_state")
    if not cs:
        return ""
    return (
        f"- continual state: the alignment is task 0 (`{cs['task']}`): `{cs['method']}` curvature of the alignment "
        f"as {cs['examples']} {cs['num_candidates']}-way linking examples (a name, its synonym and TF-IDF-nearest names "
        "of other concepts)"
        + (f", estimated on {cs['device']} in {cs['seconds']:.0f} s" if "device" in cs else "")
        + ", saved in `continual_state.*`; `ContinualTrainer.load_continual_state` on this directory "
        "protects it while fine-tuning\n"
    )


def _model_card(info: dict[str, Any]) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    base = info["base_model"]
    local = os.path.isabs(base) or base.startswith(".") or os.path.isdir(base)
    data = ModelCardData(
        base_model=None if local else base,  # Hub metadata names Hub models only, never a local directory
        library_name="transformers",
        tags=[
            "feature-extraction",
            "entity-linking",
            "sapbert",
            "self-alignment-pretraining",
            "hf_continual",
        ],
        pipeline_tag="feature-extraction",
    )
    vocab_rows = "\n".join(
        f"| {v['vocabulary']} | {v['concepts']} | {v['concepts_with_pairs']} | {v['pairs_per_concept']} | "
        f"{v['pairs_before_max']} | {v['pairs']} |"
        for v in info["pairs"]["vocabularies"]
    )
    curve = info["loss_curve"]
    stride = max(1, len(curve) // 20)
    shown = curve[::stride] + ([curve[-1]] if curve and (len(curve) - 1) % stride else [])
    loss_rows = "\n".join(f"| {c['step']} | {c['pairs_seen']} | {c['loss']:.4f} |" for c in shown)
    loss = info["loss"]
    train = info["training"]
    body = f"""
# {info["name"]}

A BERT encoder aligned on synonym pairs of concept vocabularies with the SapBERT objective (Liu et al., NAACL
2021), by `hf-continual pretrain` ({info["recipe"]["name"]}). Use it as `model: {info["output_dir"]}` in a recipe, or
`DualEncoderModel.from_base(...)`; embeddings are the mean of the last hidden states over the attention mask.

- base model: `{info["base_model"]}`
- vocabularies (dictionary names only; no corpus mention is used):

| vocabulary | concepts | concepts with >= 2 names | pairs per concept (cap) | pairs | pairs used |
|---|---|---|---|---|---|
{vocab_rows}

- pairs: {info["pairs"]["pairs"]} in all (sha256 of `{PAIRS_FILE}`: `{info["pairs_sha256"]}`), seed {info["seed"]}
- objective: multi-similarity loss (alpha {loss["alpha"]}, beta {loss["beta"]}, base {loss["base"]}) with the
  `{loss["miner"]}` miner (margin {loss["miner_margin"]}) from `pytorch-metric-learning`; max length {info["max_length"]}
- optimisation: lr {train.get("learning_rate")}, {train.get("per_device_train_batch_size")} pairs per device batch,
  {info["pairs_per_step"]} pairs per optimizer step, {info["global_step"]} steps ({info["pairs_seen"]} pairs seen,
  {info["epochs"]:.2f} epochs), scheduler {train.get("lr_scheduler_type")}, weight decay {train.get("weight_decay")}
- training time: {info["train_seconds"]:.0f} s ({info["device"]})
{_state_line(info)}
## Loss curve

![loss curve]({LOSS_PLOT})

| step | pairs seen | loss |
|---|---|---|
{loss_rows}
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def pretrain(recipe: PretrainRecipe, resume: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Run a pretraining recipe; writes the aligned BERT, its tokenizer, the model card, the pairs file and
    ``pretrain_info.json`` into ``recipe.output_dir`` and returns the info dict.

    Trainer checkpoints go to ``OUTPUT/checkpoints``; ``resume=True`` continues from the last of them (an error
    when there is none). Without ``resume`` an existing checkpoint is an error, so a run is never silently restarted.
    """
    from ...recipe import resolve_model_name
    from ...state import atomic_write_json, atomic_write_text

    out = Path(recipe.output_dir)
    ckpt_dir = out / CHECKPOINTS
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if resume and last is None:
        raise FileNotFoundError(f"--resume: no Trainer checkpoint under {ckpt_dir}")
    if not resume and last is not None:
        raise FileExistsError(
            f"{ckpt_dir} already holds {Path(last).name}: pass --resume, or another output dir"
        )
    args = recipe.training_arguments(disable_tqdm=not show_progress)
    base = resolve_model_name(recipe.model)
    model = alignment_model(base, recipe.num_hidden_layers, recipe.max_length)
    model.set_loss(SelfAlignmentLoss(**recipe.loss))
    pairs, pair_stats = build_pairs(recipe)
    out.mkdir(parents=True, exist_ok=True)
    triples = list(zip(pairs["name_a"], pairs["name_b"], pairs["label"]))
    pairs_sha = write_pairs(out / PAIRS_FILE, triples)
    pairs_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    snapshots = SnapshotCallback(out / SNAPSHOTS, pairs_per_step, len(pairs))
    callbacks: list[TrainerCallback] = [ElapsedTime()] + ([snapshots] if recipe.keep_snapshots else [])
    if recipe.save_every_minutes is not None:
        callbacks.append(SaveEveryMinutes(recipe.save_every_minutes))
    blocks = [v["pairs"] for v in pair_stats["vocabularies"]]  # pairs per vocabulary, in reading order
    callbacks.append(SaveAtSteps(vocabulary_end_steps(blocks, pairs_per_step)))
    trainer = _AlignmentTrainer(
        model=model,
        args=args,
        train_dataset=pairs,
        data_collator=PairCollator(model.get_tokenizer(), recipe.max_length),
        callbacks=callbacks,
    )
    snapshots.handler = trainer.callback_handler
    trainer.train(resume_from_checkpoint=last if resume else None)
    timer = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ElapsedTime))
    info: dict[str, Any] = {
        "name": recipe.name,
        "recipe": recipe.resolved(),
        "recipe_file": recipe.source,
        "base_model": recipe.model if recipe.model != "minilm" else "sentence-transformers/all-MiniLM-L6-v2",
        "base_model_path": base,
        "output_dir": str(out),
        "seed": recipe.seed,
        "max_length": recipe.max_length,
        "loss": recipe.loss,
        "training": recipe.training,
        "pairs": pair_stats,
        "pairs_sha256": pairs_sha,
        "pairs_content_sha256": pairs_digest(triples),
        "pairs_per_step": pairs_per_step,
        "global_step": trainer.state.global_step,
        "pairs_seen": _pairs_seen(trainer.state, pairs_per_step, len(pairs)),
        "epochs": float(trainer.state.epoch or 0.0),
        "train_seconds": timer.total(),
        "device": str(args.device),
        "loss_curve": _loss_curve(trainer.state.log_history, pairs_per_step),
        "resumed_from": last if resume else None,
    }
    if not trainer.is_world_process_zero():
        return info
    save_encoder(model, out)
    _plot_loss(info["loss_curve"], out / LOSS_PLOT)
    atomic_write_json(out / INFO_FILE, info)
    atomic_write_text(out / "README.md", _model_card(info))
    if recipe.continual_state is not None:
        info = consolidate_alignment(recipe, out, pairs=pairs)
    return info


def consolidate_alignment(
    recipe: PretrainRecipe,
    model_dir: str | os.PathLike,
    pairs: Dataset | None = None,
    use_cpu: bool | None = None,
) -> dict[str, Any]:
    """Write the task-0 continual state of an aligned model (``recipe.continual_state``: method, examples,
    candidates) beside its weights, and record it in ``pretrain_info.json`` and the model card.

    ``pretrain`` calls it after training; called on its own it completes a model trained elsewhere (e.g. on a
    GPU whose state files were too large to bring back): ``pairs`` are then rebuilt from the recipe and must
    match the ``pairs_content_sha256`` the training recorded. ``use_cpu`` defaults to the recipe's."""
    from ...state import atomic_write_json, atomic_write_text

    out = Path(model_dir)
    cs = recipe.continual_state
    if cs is None:
        raise PretrainRecipeError(f"{recipe.source}: no continual_state section to consolidate")
    info_file = out / INFO_FILE
    if not info_file.is_file():
        raise FileNotFoundError(f"{info_file}: not a `hf-continual pretrain` output directory")
    info = json.loads(info_file.read_text())
    if pairs is None:
        pairs, _ = build_pairs(recipe)
        rebuilt = pairs_digest(list(zip(pairs["name_a"], pairs["name_b"], pairs["label"])))
        recorded = info.get("pairs_content_sha256")
        if recorded != rebuilt:
            raise ValueError(
                f"{recipe.source}: the pairs rebuilt from this recipe (sha256 {rebuilt}) are not those {info_file} "
                f"was trained on ({recorded})"
            )
    if use_cpu is None:
        use_cpu = bool(recipe.training.get("use_cpu", False))
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(out))  # the weights load once, in save_alignment_state
    examples = alignment_examples(
        pairs,
        [v.load() for v in recipe.vocabularies],
        tokenizer,
        num_examples=cs["num_examples"],
        num_candidates=cs["num_candidates"],
        seed=recipe.seed,
        max_length=recipe.max_length,
    )
    save_alignment_state(out, examples, method=cs["method"], use_cpu=use_cpu)
    info["continual_state"] = {
        **cs,
        "examples": len(examples),
        "task": ALIGNMENT_TASK,
        "seconds": time.perf_counter() - t0,
        "device": "cpu" if use_cpu or not torch.cuda.is_available() else "cuda",
    }
    atomic_write_json(info_file, info)
    atomic_write_text(out / "README.md", _model_card(info))
    return info


def alignment_examples(
    pairs: Dataset,
    dictionaries: Sequence[Dictionary],
    tokenizer: PreTrainedTokenizerBase,
    num_examples: int | None = 1024,
    num_candidates: int = 8,
    seed: int = 0,
    max_length: int = 25,
) -> Dataset:
    """The alignment objective as K-way linking examples the dual encoder (and its Fisher code) takes: a
    seeded sample of pairs, ``name_a`` the mention, ``name_b`` the gold candidate (position 0) and K-1
    negatives, the names of other concepts nearest to ``name_a`` by char-3-gram TF-IDF in its vocabulary
    (``dictionaries[pair vocabulary]``; random names of other concepts fill up when too few remain)."""
    from .retriever import TfidfRetriever

    if num_candidates < 2:
        raise ValueError("num_candidates must be >= 2 (the synonym and at least one negative)")
    rng = random.Random(seed)
    rows = range(len(pairs))
    if num_examples is not None and num_examples < len(pairs):
        rows = sorted(rng.sample(rows, num_examples))
    sample = pairs.select(rows)
    queries, texts = [], []
    for k, dictionary in enumerate(dictionaries):
        mine = [i for i, v in enumerate(sample["vocabulary"]) if v == k]
        if not mine:
            continue
        retriever = TfidfRetriever(dictionary.names)
        top, _ = retriever.topk([sample[i]["name_a"] for i in mine], num_candidates + 32)
        for i, ranked in zip(mine, top):
            row = sample[i]
            own = set(row["ids"])
            negatives: list[str] = []
            for j in list(ranked) + [rng.randrange(len(dictionary)) for _ in range(16 * num_candidates)]:
                name = dictionary.names[int(j)]
                if len(negatives) == num_candidates - 1:
                    break
                if own.isdisjoint(dictionary.name_ids[int(j)]) and name not in negatives:
                    negatives.append(name)
            if len(negatives) < num_candidates - 1:
                raise ValueError(
                    f"{dictionary.source}: too few names outside {sorted(own)} for {num_candidates} candidates"
                )
            queries.append(row["name_a"])
            texts.append([row["name_b"], *negatives])
    mention = tokenizer(queries, truncation=True, max_length=max_length)
    flat = tokenizer([t for group in texts for t in group], truncation=True, max_length=max_length)

    def regroup(values: Sequence[list[int]]) -> list[list[list[int]]]:
        return [list(values[i * num_candidates : (i + 1) * num_candidates]) for i in range(len(queries))]

    columns = {
        "mention_input_ids": mention["input_ids"],
        "mention_attention_mask": mention["attention_mask"],
        "candidate_input_ids": regroup(flat["input_ids"]),
        "candidate_attention_mask": regroup(flat["attention_mask"]),
        "labels": [0] * len(queries),
    }
    return Dataset.from_dict(columns)


def save_alignment_state(
    model_dir: str | os.PathLike,
    examples: Dataset,
    method: str = "kfac",
    use_cpu: bool = True,
    **config: Any,
) -> dict[str, Any]:
    """Consolidate the alignment as task 0 of the aligned model: the ``method``'s curvature (K-FAC factors +
    diagonal elsewhere for ``kfac``, diagonal for ``ewc``) of :func:`alignment_examples` and the anchor, saved as
    ``continual_state.*`` beside the weights in ``model_dir``, so ``ContinualTrainer.load_continual_state``
    protects the vocabulary knowledge when the model is fine-tuned later. Uses only the public
    ``ContinualTrainer`` API (``end_task``, ``save_model``). Returns the state's record."""
    import tempfile

    from ...config import ContinualConfig
    from ...trainer import ContinualTrainer
    from .data import DualEncoderCollator

    model_dir = Path(model_dir)
    model = DualEncoderModel.from_base(str(model_dir))
    pad = model.get_tokenizer().pad_token_id or 0
    with tempfile.TemporaryDirectory(dir=model_dir) as tmp:
        args = ContinualConfig(
            output_dir=tmp,
            continual_method=method,
            report_to="none",
            use_cpu=use_cpu,
            fisher_num_samples=len(examples),
            **config,
        )
        trainer = ContinualTrainer(
            model=model,
            args=args,
            train_dataset=examples,
            data_collator=DualEncoderCollator(pad_token_id=pad),
        )
        trainer.end_task(task_name=ALIGNMENT_TASK)
        trainer.save_model(tmp)
        names = [f for f in os.listdir(tmp) if f.startswith("continual_state")]
        if not names:
            raise RuntimeError(f"ContinualTrainer.save_model wrote no continual state into {tmp}")
        for name in names:
            os.replace(Path(tmp) / name, model_dir / name)
    return json.loads((model_dir / "continual_state.json").read_text())


def json_summary(info: dict[str, Any]) -> str:
    """One line for the CLI: pairs, steps, time, last loss."""
    last = info["loss_curve"][-1]["loss"] if info["loss_curve"] else None
    return json.dumps(
        {
            "output_dir": info["output_dir"],
            "pairs": info["pairs"]["pairs"],
            "steps": info["global_step"],
            "pairs_seen": info["pairs_seen"],
            "train_seconds": round(info["train_seconds"], 1),
            "last_loss": last,
        }
    )


__all__ = [
    "PairCollator",
    "PretrainRecipe",
    "PretrainRecipeError",
    "SelfAlignmentLoss",
    "SelfAlignmentModel",
    "alignment_model",
    "build_pairs",
    "concept_names",
    "consolidate_alignment",
    "load_pretrain_recipe",
    "pairs_digest",
    "pretrain",
    "synonym_pairs",
    "write_pairs",
]
