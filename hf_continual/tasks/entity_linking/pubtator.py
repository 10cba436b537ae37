"""PubTator corpus reader (NCBI-disease, BC5CDR, S800 and any other corpus in the same format).

Format, one document per blank-line-separated block::

    PMID|t|title
    PMID|a|abstract
    PMID<TAB>start<TAB>end<TAB>mention<TAB>type<TAB>ids[<TAB>individual mentions]
    PMID<TAB>CID<TAB>chemical<TAB>disease[<TAB>more fields]   (relation lines: counted, ignored)

Offsets are over ``title + " " + abstract``. Quirks handled here, so that no corpus needs its own code:
files may be gzipped (recognised by their magic bytes) and have CRLF line ends; relation lines may carry more than
4 fields (e.g. a novelty flag); composite ids joined by ``+`` (NCBI), ``|`` (BC5CDR) or ``,`` (other releases)
become a list of atomic ids; ``-1`` means "no id" (the mention is kept, with ``ids == []``, and counted as
unlinkable); ids are normalised to one canonical form on the corpus and the vocabulary side by the corpus's
:class:`IdRules`; mention strings are stripped and checked against the text at their offsets; a document whose
PMID was already read is skipped (NCBI train holds PMID 8528200 twice) and counted. Any malformed line raises
:class:`PubTatorFormatError` naming the file and the 1-based line number.
"""

from __future__ import annotations

import gzip
import logging
import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, Sequence, Value

from .errors import DataFormatError, PubTatorFormatError

logger = logging.getLogger(__name__)

_TEXT_LINE = re.compile(r"^([^\t|]+)\|([ta])\|(.*)$")
_ATOM = re.compile(r"^[A-Za-z0-9_.\-:]+$")
_RELATION_TYPE = re.compile(r"^[A-Za-z][\w\-]*$")
_COMPOSITE_SEPARATORS = re.compile(r"[+|,]")
UNLINKED_ID = "-1"

MENTION_FEATURES = (
    "pmid",
    "start",
    "end",
    "mention",
    "type",
    "ids",
    "raw_ids",
    "composite",
    "individual_mentions",
    "text",
)


def iter_text_lines(path: str | Path, bar: Any = None) -> Iterator[str]:
    """The lines of a UTF-8 text file, gzipped or not (gzip recognised by its magic bytes), without line ends.

    Lines are split on ``\\n`` only and a trailing ``\\r`` is removed (CRLF files), so a stray carriage return
    inside a line never splits it. A line that is not UTF-8 raises :class:`~.errors.DataFormatError` naming the
    file and the 1-based line. ``bar``: a ``tqdm`` bar whose ``total`` is the file's size, advanced by the bytes
    read (compressed bytes for a gzipped file).
    """
    path = Path(path)
    with path.open("rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    with opener(path, "rb") as handle:
        position = getattr(handle, "fileobj", None) or handle  # a GzipFile reads from .fileobj
        for line_number, data in enumerate(handle, start=1):
            if bar is not None and line_number % 8192 == 0:
                bar.update(position.tell() - bar.n)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(
                    path, line_number, f"not UTF-8 ({err.reason} at byte {err.start})"
                ) from None
            if line_number == 1:
                text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark
            yield text.rstrip("\n").rstrip("\r")
        if bar is not None and bar.total:
            bar.update(bar.total - bar.n)


@dataclass(frozen=True)
class IdRules:
    """How one corpus and its vocabulary write concept ids, and the canonical form both are compared in.

    ``prefixes`` maps a prefix as written (matched case-insensitively, longest first) to the canonical prefix it
    becomes (``""`` drops it); the key ``""`` is the prefix given to a bare all-digit id (absent: bare numbers stay
    bare). The default, :data:`MESH_OMIM_ID_RULES`, is the rule of the MeSH/OMIM disease and chemical corpora:
    ``MESH:D012345`` -> ``D012345``, ``OMIM:123456`` and bare ``123456`` (MEDIC) -> ``OMIM:123456``. NCBI Taxonomy
    ids (S800) are bare numbers too, so that corpus declares its own rule (``{"NCBITaxon:": "NCBITaxon:",
    "": "NCBITaxon:"}``) and a taxid never reads as an OMIM number.
    """

    prefixes: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for written, canonical in self.prefixes:
            if not isinstance(written, str) or not isinstance(canonical, str):
                raise ValueError(f"id prefix rule {written!r}: {canonical!r}: both sides must be strings")
            if any(c.isspace() for c in written + canonical):
                raise ValueError(
                    f"id prefix rule {written!r}: {canonical!r}: prefixes cannot hold whitespace"
                )
        keys = [w.lower() for w, _ in self.prefixes]
        if len(set(keys)) != len(keys):
            raise ValueError(f"id prefix rules list a prefix twice: {[w for w, _ in self.prefixes]}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str | None]) -> IdRules:
        """``{written prefix: canonical prefix}`` (``None`` or ``""`` drops the prefix; key ``""``: bare numbers)."""
        return cls(tuple((str(k), "" if v is None else str(v)) for k, v in mapping.items()))

    def as_mapping(self) -> dict[str, str]:
        return dict(self.prefixes)

    def normalize(self, raw: str) -> str:
        """The canonical form of one atomic id (whitespace stripped; unknown prefixes kept as written)."""
        atom = raw.strip()
        lower = atom.lower()
        for written, canonical in sorted(self.prefixes, key=lambda p: -len(p[0])):
            if written and lower.startswith(written.lower()):
                return canonical + atom[len(written) :].strip()
        bare = dict(self.prefixes).get("")
        if bare is not None and atom.isdigit():
            return bare + atom
        return atom


MESH_OMIM_ID_RULES = IdRules((("MESH:", ""), ("OMIM:", "OMIM:"), ("", "OMIM:")))


def normalize_concept_id(raw: str, rules: IdRules = MESH_OMIM_ID_RULES) -> str:
    """Return the canonical form of one atomic concept id under ``rules`` (default: the MeSH/OMIM corpora's).

    Both the corpus and the dictionary readers use this function with the corpus's rules, which makes their ids
    comparable; see :class:`IdRules`.
    """
    return rules.normalize(raw)


def split_concept_ids(field_value: str, rules: IdRules = MESH_OMIM_ID_RULES) -> list[str]:
    """Split a (possibly composite) id field on ``+``, ``|`` and ``,`` into canonical atomic ids.

    ``-1`` atoms mean "no id" and are dropped, so an unlinkable mention yields ``[]``. Duplicates are
    removed, first occurrence order kept. Raises ``ValueError`` for an empty atom or one with odd characters.
    """
    atoms: list[str] = []
    for part in _COMPOSITE_SEPARATORS.split(field_value):
        part = part.strip()
        if not part:
            raise ValueError(f"empty concept id in {field_value!r}")
        if part == UNLINKED_ID:
            continue
        if not _ATOM.match(part):
            raise ValueError(f"invalid concept id {part!r}")
        atom = normalize_concept_id(part, rules)
        if atom not in atoms:
            atoms.append(atom)
    return atoms


@dataclass
class PubTatorMention:
    """One annotated mention; ``ids`` are canonical atomic ids (empty when the corpus says ``-1``)."""

    start: int
    end: int
    mention: str
    type: str
    ids: list[str]
    raw_ids: str
    individual_mentions: list[str] = field(default_factory=list)

    @property
    def composite(self) -> bool:
        """True when the mention carries more than one concept id or lists individual mentions."""
        return len(self.ids) > 1 or bool(self.individual_mentions)


@dataclass
class PubTatorDocument:
    """A PubTator document: PMID, title, abstract and its (type-filtered) mentions."""

    pmid: str
    title: str = ""
    abstract: str = ""
    mentions: list[PubTatorMention] = field(default_factory=list)
    has_title: bool = False
    has_abstract: bool = False

    @property
    def text(self) -> str:
        """The text the offsets refer to: ``title + " " + abstract``."""
        return f"{self.title} {self.abstract}"


def parse_pubtator_lines(
    lines: Iterable[str],
    source: str | Path = "<lines>",
    types: Collection[str] | None = None,
    id_rules: IdRules = MESH_OMIM_ID_RULES,
) -> tuple[list[PubTatorDocument], dict[str, int]]:
    """Parse PubTator lines; keep mentions whose type is in ``types`` (all types when None); ids canonical under
    ``id_rules``.

    Returns the documents (first copy of a duplicated PMID only) and counts: ``documents``,
    ``duplicate_documents``, ``entity_lines`` (selected types, duplicates included, as released),
    ``mentions`` (after dropping duplicate documents), ``composite``, ``unlinkable`` (id ``-1``),
    ``relation_lines``. Raises :class:`PubTatorFormatError` (file and 1-based line) on a malformed line.
    """
    wanted = None if types is None else set(types)
    documents: list[PubTatorDocument] = []
    seen: dict[str, PubTatorDocument] = {}
    stats = {
        "documents": 0,
        "duplicate_documents": 0,
        "entity_lines": 0,
        "mentions": 0,
        "composite": 0,
        "unlinkable": 0,
        "relation_lines": 0,
    }
    current: PubTatorDocument | None = None
    current_is_duplicate = False

    def finish() -> None:
        nonlocal current, current_is_duplicate
        if current is not None and not current_is_duplicate:
            documents.append(current)
            seen[current.pmid] = current
            stats["documents"] += 1
            stats["mentions"] += len(current.mentions)
            stats["composite"] += sum(m.composite for m in current.mentions)
            stats["unlinkable"] += sum(not m.ids for m in current.mentions)
        elif current is not None:
            first = seen[current.pmid]
            if (first.text, [(m.start, m.end, m.raw_ids) for m in first.mentions]) != (
                current.text,
                [(m.start, m.end, m.raw_ids) for m in current.mentions],
            ):
                logger.warning(
                    "%s: PMID %s appears twice with different content; kept the first", source, current.pmid
                )
        current = None
        current_is_duplicate = False

    for line_number, raw_line in enumerate(lines, start=1):
        line = raw_line.rstrip("\r\n")

        def fail(reason: str, _n: int = line_number, _line: str = line) -> PubTatorFormatError:
            return PubTatorFormatError(source, _n, reason, _line)

        if not line.strip():
            finish()
            continue
        text_match = _TEXT_LINE.match(line)
        if text_match:
            pmid, kind, content = text_match.groups()
            if kind == "t":
                if current is not None and (current.has_title or current.mentions):
                    finish()  # tolerate a missing blank line between documents
                if current is None:
                    current = PubTatorDocument(pmid=pmid)
                    current_is_duplicate = pmid in seen
                    if current_is_duplicate:
                        stats["duplicate_documents"] += 1
                elif current.pmid != pmid:
                    raise fail(f"title PMID {pmid} inside document {current.pmid}")
                current.title, current.has_title = content, True
            else:
                if current is None or not current.has_title or current.pmid != pmid:
                    raise fail(f"abstract line for PMID {pmid} without a preceding title line")
                if current.has_abstract:
                    raise fail(f"second abstract line for PMID {pmid}")
                current.abstract, current.has_abstract = content, True
            continue
        fields = line.split("\t")
        if len(fields) < 4:
            raise fail(f"expected a title/abstract line or >= 4 tab-separated fields, got {len(fields)}")
        pmid = fields[0].strip()
        if current is None or not current.has_title:
            raise fail(f"annotation for PMID {pmid} before the document's title line")
        if pmid != current.pmid:
            raise fail(f"annotation PMID {pmid} inside document {current.pmid}")
        first, second = fields[1].strip(), fields[2].strip()
        if not (first.isdigit() and second.isdigit()):
            if not first.isdigit() and not second.isdigit() and _RELATION_TYPE.match(first):
                stats["relation_lines"] += 1  # PMID<TAB>CID<TAB>chemical<TAB>disease[<TAB>novelty ...]
                continue
            raise fail("entity line with non-integer offsets (and not a relation line)")
        if len(fields) not in (6, 7):
            raise fail(f"entity line must have 6 or 7 tab-separated fields, got {len(fields)}")
        start, end = int(fields[1]), int(fields[2])
        mention, mention_type = fields[3].strip(), fields[4].strip()
        text = current.text
        if not (0 <= start < end <= len(text)):
            raise fail(f"offsets {start}-{end} outside the document text (length {len(text)})")
        if not mention or text[start:end].strip() != mention:
            raise fail(f"mention {mention!r} does not match the text at {start}-{end}: {text[start:end]!r}")
        if not mention_type:
            raise fail("empty entity type")
        if wanted is not None and mention_type not in wanted:
            continue
        try:
            ids = split_concept_ids(fields[5], id_rules)
        except ValueError as err:
            raise fail(str(err)) from None
        individual = (
            [s.strip() for s in fields[6].split("|")] if len(fields) == 7 and fields[6].strip() else []
        )
        stats["entity_lines"] += 1
        current.mentions.append(
            PubTatorMention(start, end, mention, mention_type, ids, fields[5].strip(), individual)
        )
    finish()
    return documents, stats


def read_pubtator(
    path: str | Path, types: Collection[str] | None = None, id_rules: IdRules = MESH_OMIM_ID_RULES
) -> tuple[list[PubTatorDocument], dict[str, int]]:
    """Read a PubTator file (UTF-8, gzipped or not, LF or CRLF); see :func:`parse_pubtator_lines` for the result
    and the errors."""
    path = Path(path)
    return parse_pubtator_lines(iter_text_lines(path), source=path, types=types, id_rules=id_rules)


def documents_to_dataset(documents: Iterable[PubTatorDocument]) -> Dataset:
    """One row per mention: ``pmid, start, end, mention, type, ids, raw_ids, composite,
    individual_mentions, text`` (``text`` = title + " " + abstract, kept for abbreviation expansion)."""
    rows: dict[str, list] = {name: [] for name in MENTION_FEATURES}
    for doc in documents:
        text = doc.text
        for m in doc.mentions:
            for key, value in (
                ("pmid", doc.pmid),
                ("start", m.start),
                ("end", m.end),
                ("mention", m.mention),
                ("type", m.type),
                ("ids", list(m.ids)),
                ("raw_ids", m.raw_ids),
                ("composite", m.composite),
                ("individual_mentions", list(m.individual_mentions)),
                ("text", text),
            ):
                rows[key].append(value)
    features = Features(
        {
            "pmid": Value("string"),
            "start": Value("int32"),
            "end": Value("int32"),
            "mention": Value("string"),
            "type": Value("string"),
            "ids": Sequence(Value("string")),
            "raw_ids": Value("string"),
            "composite": Value("bool"),
            "individual_mentions": Sequence(Value("string")),
            "text": Value("string"),
        }
    )
    return Dataset.from_dict(rows, features=features)


def load_pubtator_mentions(
    path: str | Path, types: Collection[str] | None = None, id_rules: IdRules = MESH_OMIM_ID_RULES
) -> tuple[Dataset, dict[str, int]]:
    """Read a PubTator file into a mention-level ``datasets.Dataset`` plus its stats dict."""
    documents, stats = read_pubtator(path, types=types, id_rules=id_rules)
    return documents_to_dataset(documents), stats
