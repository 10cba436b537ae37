"""PubTator corpus reader (NCBI-disease, BC5CDR and any other corpus in the same format).

Format, one document per blank-line-separated block::

    PMID|t|title
    PMID|a|abstract
    PMID<TAB>start<TAB>end<TAB>mention<TAB>type<TAB>ids[<TAB>individual mentions]
    PMID<TAB>CID<TAB>chemical<TAB>disease            (relation lines: ignored)

Offsets are over ``title + " " + abstract``. Quirks handled here, so that no corpus needs its own code:
composite ids joined by ``+`` (NCBI) or ``|`` (BC5CDR) become a list of atomic ids; ``-1`` means "no id"
(the mention is kept, with ``ids == []``, and counted as unlinkable); ids are normalised to one canonical
form on the corpus and the vocabulary side (:func:`normalize_concept_id`); mention strings are stripped and
checked against the text at their offsets; a document whose PMID was already read is skipped (NCBI train
holds PMID 8528200 twice) and counted. Any malformed line raises :class:`PubTatorFormatError` naming the
file and the 1-based line number.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, Features, Sequence, Value

from .errors import PubTatorFormatError

logger = logging.getLogger(__name__)

_TEXT_LINE = re.compile(r"^([^\t|]+)\|([ta])\|(.*)$")
_ATOM = re.compile(r"^[A-Za-z0-9_.\-:]+$")
_MESH = re.compile(r"^[CD]\d+$")
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


def normalize_concept_id(raw: str) -> str:
    """Return the canonical form of one atomic concept id.

    MeSH ids lose a ``MESH:`` prefix (``MESH:D012345`` -> ``D012345``); OMIM ids carry the prefix
    (bare ``123456`` as in MEDIC, or ``OMIM:123456`` as in NCBI -> ``OMIM:123456``); anything else is kept
    as is (after stripping whitespace), so a new vocabulary works unchanged. Both the corpus and the
    dictionary readers use this function, which makes their ids comparable.
    """
    atom = raw.strip()
    upper = atom.upper()
    if upper.startswith("MESH:"):
        atom = atom[5:].strip()
    elif upper.startswith("OMIM:"):
        atom = "OMIM:" + atom[5:].strip()
    elif atom.isdigit():
        atom = "OMIM:" + atom
    return atom


def split_concept_ids(field_value: str) -> list[str]:
    """Split a (possibly composite) id field on ``+`` and ``|`` into canonical atomic ids.

    ``-1`` atoms mean "no id" and are dropped, so an unlinkable mention yields ``[]``. Duplicates are
    removed, first occurrence order kept. Raises ``ValueError`` for an empty atom or one with odd characters.
    """
    atoms: list[str] = []
    for part in re.split(r"[+|]", field_value):
        part = part.strip()
        if not part:
            raise ValueError(f"empty concept id in {field_value!r}")
        if part == UNLINKED_ID:
            continue
        if not _ATOM.match(part):
            raise ValueError(f"invalid concept id {part!r}")
        atom = normalize_concept_id(part)
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
    lines: Iterable[str], source: str | Path = "<lines>", types: Collection[str] | None = None
) -> tuple[list[PubTatorDocument], dict[str, int]]:
    """Parse PubTator lines; keep mentions whose type is in ``types`` (all types when None).

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
        if not (fields[1].strip().isdigit() and fields[2].strip().isdigit()):
            if len(fields) == 4 and fields[1].strip():
                stats["relation_lines"] += 1  # e.g. PMID<TAB>CID<TAB>chemical<TAB>disease
                continue
            raise fail("entity line with non-integer offsets (and not a 4-field relation line)")
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
            ids = split_concept_ids(fields[5])
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
    path: str | Path, types: Collection[str] | None = None
) -> tuple[list[PubTatorDocument], dict[str, int]]:
    """Read a PubTator file (UTF-8); see :func:`parse_pubtator_lines` for the result and the errors."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        return parse_pubtator_lines(handle, source=path, types=types)


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
    path: str | Path, types: Collection[str] | None = None
) -> tuple[Dataset, dict[str, int]]:
    """Read a PubTator file into a mention-level ``datasets.Dataset`` plus its stats dict."""
    documents, stats = read_pubtator(path, types=types)
    return documents_to_dataset(documents), stats
