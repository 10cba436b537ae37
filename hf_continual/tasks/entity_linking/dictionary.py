"""Concept vocabularies ("dictionaries") for entity linking: readers, name normalisation, candidate sets.

Two on-disk formats are read by one entry point, :func:`load_dictionary` (format given, or chosen by the file name):

* ``medic``: MEDIC / BioSyn style ``ID[|ID...]||name[|synonym...]`` (``.txt``, optionally gzipped);
* ``tsv``: a TSV with a header (``.tsv``/``.tsv.gz``); the id, name and (``|``-joined) synonym columns are named
  by the caller: ``ChemicalID`` / ``ChemicalName`` / ``Synonyms`` by default (the MeSH chemical file), e.g.
  ``DiseaseID`` / ``DiseaseName`` / ``Synonyms`` for CTD's disease file.

Files may be gzipped and have CRLF line ends. Ids go through :func:`~.pubtator.normalize_concept_id` with the
corpus's :class:`~.pubtator.IdRules`, so the corpus side and the dictionary side compare equal. Names are indexed by :func:`normalize_name`, the single normalisation used for mentions, dictionary
names, retrieval and training text alike.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import DictionaryFormatError
from .pubtator import MESH_OMIM_ID_RULES, IdRules, iter_text_lines, normalize_concept_id

_PUNCT = re.compile(r"[^\w\s]|_", flags=re.UNICODE)
_SPACE = re.compile(r"\s+", flags=re.UNICODE)


def normalize_name(text: str) -> str:
    """Lowercase, fold punctuation to spaces and collapse whitespace (``"Type-2 Diabetes,"`` -> ``"type 2 diabetes"``)."""
    return _SPACE.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


@dataclass(frozen=True)
class DictionaryEntry:
    """One name of one concept record as written in the vocabulary, with the record's canonical ids."""

    name: str
    ids: tuple[str, ...]


class Dictionary:
    """A concept vocabulary indexed by normalised name.

    ``entries`` keeps every (name, ids) pair as read. ``names[i]`` is a unique normalised name and
    ``name_ids[i]`` the ids of every record that has it (a name can belong to several concepts);
    ``id_to_names`` maps an id to the indices of its names. Empty normalised names are skipped.
    """

    def __init__(
        self,
        entries: Iterable[DictionaryEntry | tuple[str, Sequence[str]]],
        source: str = "",
        show_progress: bool | None = False,
    ) -> None:
        """``show_progress``: a bar while the names are indexed (see :mod:`hf_continual.progress`)."""
        from ...progress import progress

        self.source = source
        self.entries: list[DictionaryEntry] = [
            e if isinstance(e, DictionaryEntry) else DictionaryEntry(e[0], tuple(e[1])) for e in entries
        ]
        index: dict[str, int] = {}
        self.names: list[str] = []
        ids_per_name: list[list[str]] = []
        for entry in progress(self.entries, desc="indexing names", show=show_progress, unit="name"):
            norm = normalize_name(entry.name)
            if not norm:
                continue
            i = index.get(norm)
            if i is None:
                i = index[norm] = len(self.names)
                self.names.append(norm)
                ids_per_name.append([])
            for concept_id in entry.ids:
                if concept_id not in ids_per_name[i]:
                    ids_per_name[i].append(concept_id)
        self.name_ids: list[tuple[str, ...]] = [tuple(ids) for ids in ids_per_name]
        self.name_index = index
        self.id_to_names: dict[str, list[int]] = {}
        for i, ids in enumerate(self.name_ids):
            for concept_id in ids:
                self.id_to_names.setdefault(concept_id, []).append(i)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, concept_id: object) -> bool:
        return concept_id in self.id_to_names

    def __repr__(self) -> str:
        return f"Dictionary({len(self.names)} names, {len(self.id_to_names)} ids, source={self.source!r})"

    @property
    def num_ids(self) -> int:
        """Number of distinct concept ids."""
        return len(self.id_to_names)

    def names_of(self, concept_id: str) -> list[str]:
        """Normalised names of one concept id (empty list when the id is not in the dictionary)."""
        return [self.names[i] for i in self.id_to_names.get(concept_id, [])]

    def linkable(self, gold_ids: Iterable[str]) -> bool:
        """True when at least one gold atom is in the dictionary (lenient, as the evaluation)."""
        return any(g in self.id_to_names for g in gold_ids)

    def subset(self, name_indices: Iterable[int], source: str | None = None) -> Dictionary:
        """A new dictionary made of the given unique names, each with all its ids."""
        rows = sorted(set(name_indices))
        return Dictionary(
            [DictionaryEntry(self.names[i], self.name_ids[i]) for i in rows],
            source=self.source if source is None else source,
        )

    def augmented(
        self, names: Iterable[tuple[str, Sequence[str]]], source: str | None = None
    ) -> tuple[Dictionary, dict[str, int]]:
        """This dictionary plus extra (name, ids) pairs, e.g. training-split mention texts with their gold ids.

        Only ids the dictionary already has are attached (the concept inventory stays the same); a pair with none
        of them is skipped. Returns the new dictionary and counts: pairs given, pairs used, skipped, and names
        that were not in the dictionary before.
        """
        extra: list[DictionaryEntry] = []
        skipped = new = 0
        seen_new: set[str] = set()
        for text, ids in names:
            known = tuple(i for i in ids if i in self.id_to_names)
            norm = normalize_name(text)
            if not known or not norm:
                skipped += 1
                continue
            extra.append(DictionaryEntry(text, known))
            if norm not in self.name_index and norm not in seen_new:
                seen_new.add(norm)
                new += 1
        out = Dictionary([*self.entries, *extra], source=self.source if source is None else source)
        return out, {"given": len(extra) + skipped, "added": len(extra), "skipped": skipped, "new_names": new}

    def candidate_set(self, gold_ids: Iterable[str], num_other: int = 20_000, seed: int = 0) -> Dictionary:
        """The documented reduced evaluation set: every name of every given gold id, plus a fixed-seed
        sample of ``num_other`` other names (names that carry none of the gold ids)."""
        gold = set(gold_ids)
        keep = {i for g in gold for i in self.id_to_names.get(g, [])}
        others = [i for i in range(len(self.names)) if i not in keep]
        rng = random.Random(seed)
        sample = rng.sample(others, min(num_other, len(others)))
        return self.subset(
            keep.union(sample), source=f"{self.source} [gold ids + {len(sample)} sampled names]"
        )


DICTIONARY_FORMATS = ("auto", "medic", "tsv")


def iter_medic_entries(
    lines: Iterable[str], source: str | Path = "<lines>", id_rules: IdRules = MESH_OMIM_ID_RULES
) -> Iterator[DictionaryEntry]:
    """Parse ``ID[|ID...]||name[|synonym...]`` lines; blank and ``#`` lines are skipped.

    Raises :class:`DictionaryFormatError` (file, 1-based line) when ``||`` is missing or ids/names are empty.
    """
    for line_number, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if not line.strip() or line.startswith("#"):
            continue
        if "||" not in line:
            raise DictionaryFormatError(source, line_number, "expected 'ID[|ID...]||name[|synonym...]'", line)
        id_part, name_part = line.split("||", 1)
        ids = [normalize_concept_id(a, id_rules) for a in id_part.split("|")]
        names = [n.strip() for n in name_part.split("|") if n.strip()]
        if not ids or any(not a for a in ids):
            raise DictionaryFormatError(source, line_number, "empty concept id", line)
        if not names:
            raise DictionaryFormatError(source, line_number, "concept without a name", line)
        for name in names:
            yield DictionaryEntry(name, tuple(ids))


def iter_tsv_entries(
    lines: Iterable[str],
    source: str | Path = "<lines>",
    id_column: str = "ChemicalID",
    name_column: str = "ChemicalName",
    synonym_column: str | None = "Synonyms",
    id_rules: IdRules = MESH_OMIM_ID_RULES,
) -> Iterator[DictionaryEntry]:
    """Parse a headed TSV vocabulary (one record per line; synonyms ``|``-joined; ids may be ``|``-joined).

    Leading ``#`` comment lines are skipped (CTD files carry them); the first other line is the header
    (a leading ``#`` on it is removed). ``synonym_column=None``: the file has no synonym column. Raises
    :class:`DictionaryFormatError` (file, 1-based line) for a missing column, a wrong field count or an empty
    id/name.
    """
    header: list[str] | None = None
    for line_number, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if header is None:
            stripped = line.lstrip("#").strip()
            if line.startswith("#") and id_column not in stripped.split("\t"):
                continue
            if not stripped:
                continue
            header = [h.strip() for h in stripped.split("\t")]
            missing = [c for c in (id_column, name_column, synonym_column) if c and c not in header]
            if missing:
                raise DictionaryFormatError(source, line_number, f"header lacks column(s) {missing}", line)
            id_at, name_at = header.index(id_column), header.index(name_column)
            syn_at = header.index(synonym_column) if synonym_column else None
            continue
        if not line.lstrip("#").strip():  # blank, or a bare "#" separator line (CTD files have one)
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DictionaryFormatError(
                source, line_number, f"expected {len(header)} tab-separated fields, got {len(fields)}", line
            )
        ids = [normalize_concept_id(a, id_rules) for a in fields[id_at].split("|") if a.strip()]
        name = fields[name_at].strip()
        if not ids:
            raise DictionaryFormatError(source, line_number, f"empty {id_column}", line)
        if not name:
            raise DictionaryFormatError(source, line_number, f"empty {name_column}", line)
        names = [name]
        if syn_at is not None:
            names += [s.strip() for s in fields[syn_at].split("|") if s.strip()]
        for n in names:
            yield DictionaryEntry(n, tuple(ids))
    if header is None:
        raise DictionaryFormatError(source, 1, "empty TSV vocabulary (no header line)")


def load_dictionary(
    path: str | Path,
    format: str = "auto",
    id_rules: IdRules = MESH_OMIM_ID_RULES,
    *,
    show_progress: bool | None = None,
    **tsv_columns: str | None,
) -> Dictionary:
    """Load a vocabulary file (gzipped or not). ``format``: ``"tsv"`` -> :func:`iter_tsv_entries` (keyword
    arguments ``id_column``, ``name_column``, ``synonym_column`` name the columns), ``"medic"`` ->
    :func:`iter_medic_entries`, ``"auto"`` -> ``tsv`` for ``*.tsv``/``*.tsv.gz`` file names, else ``medic``.
    ``show_progress``: a bar over the bytes read, see :mod:`hf_continual.progress` (default: on a terminal)."""
    from ...progress import progress

    path = Path(path)
    if format not in DICTIONARY_FORMATS:
        raise ValueError(f"dictionary format must be one of {DICTIONARY_FORMATS}, got {format!r}")
    if format == "auto":
        format = "tsv" if ".tsv" in [s.lower() for s in path.suffixes] else "medic"
    if format == "medic" and tsv_columns:
        raise ValueError(f"{path}: column names {sorted(tsv_columns)} apply to the tsv format only")
    size = path.stat().st_size
    with progress(
        desc=f"loading {path.name}", show=show_progress, total=size, unit="B", unit_scale=True
    ) as bar:
        lines = iter_text_lines(path, bar=bar)
        if format == "tsv":
            entries = list(iter_tsv_entries(lines, source=path, id_rules=id_rules, **tsv_columns))
        else:
            entries = list(iter_medic_entries(lines, source=path, id_rules=id_rules))
    return Dictionary(entries, source=str(path), show_progress=show_progress)
