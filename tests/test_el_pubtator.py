"""PubTator reader: real-corpus counts, quirks (composite, -1, OMIM, duplicate PMID, trailing spaces), errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_continual.tasks.entity_linking import (
    PubTatorFormatError,
    load_pubtator_mentions,
    normalize_concept_id,
    parse_pubtator_lines,
    read_pubtator,
    split_concept_ids,
)

DATA = Path(
    os.environ.get("HF_CONTINUAL_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)
needs_data = pytest.mark.skipif(
    not (DATA / "ncbi_disease").is_dir() or not (DATA / "bc5cdr").is_dir(),
    reason=f"corpus data not found at {DATA} (set HF_CONTINUAL_DATA)",
)

TITLE = "Wilson disease and copper toxicosis."
ABSTRACT = "Wilson disease (WD) is rare. Breast or ovarian cancer occurs."
TEXT = f"{TITLE} {ABSTRACT}"


def _doc(pmid: str, entity_lines: list[str]) -> list[str]:
    return [f"{pmid}|t|{TITLE}", f"{pmid}|a|{ABSTRACT}", *entity_lines, ""]


def _span(mention: str, occurrence: int = 0) -> tuple[int, int]:
    start = -1
    for _ in range(occurrence + 1):
        start = TEXT.index(mention, start + 1)
    return start, start + len(mention)


@needs_data
def test_ncbi_train_counts_and_duplicate_pmid() -> None:
    docs, stats = read_pubtator(DATA / "ncbi_disease" / "NCBItrainset_corpus.txt")
    assert stats["entity_lines"] == 5145  # as released, both copies of PMID 8528200
    assert stats["mentions"] == 5134  # the duplicate document read once
    assert stats["documents"] == 592 and stats["duplicate_documents"] == 1
    assert [d.pmid for d in docs].count("8528200") == 1
    assert stats["unlinkable"] == 0


@needs_data
def test_bc5cdr_train_counts_by_type() -> None:
    path = DATA / "bc5cdr" / "CDR_TrainingSet.PubTator.txt"
    _, disease = read_pubtator(path, types=["Disease"])
    _, chemical = read_pubtator(path, types=["Chemical"])
    assert disease["mentions"] == 4182 and chemical["mentions"] == 5203
    assert disease["unlinkable"] == 32 and chemical["unlinkable"] == 44
    assert disease["documents"] == 500 and disease["relation_lines"] > 0


@needs_data
def test_ncbi_trailing_space_mention_is_stripped_and_matches_offsets() -> None:
    ds, _ = load_pubtator_mentions(DATA / "ncbi_disease" / "NCBItrainset_corpus.txt")
    row = next(r for r in ds if r["pmid"] == "10923035" and r["start"] == 711)
    assert row["mention"] == row["mention"].strip() and row["mention"].endswith('" plus "')
    assert row["text"][row["start"] : row["end"]].strip() == row["mention"]
    assert row["ids"] == ["D004829", "D003294"] and row["composite"]


def test_composite_unlinked_and_id_normalisation() -> None:
    s1, s2, s3 = _span("Wilson disease"), _span("Breast or ovarian cancer"), _span("copper toxicosis")
    lines = _doc(
        "1",
        [
            f"1\t{s1[0]}\t{s1[1]}\tWilson disease\tSpecificDisease\tOMIM:277900",
            f"1\t{s2[0]}\t{s2[1]}\tBreast or ovarian cancer\tCompositeMention\tD001943+D010051",
            f"1\t{s3[0]}\t{s3[1]}\tcopper toxicosis\tDisease\t-1",
            "1\tCID\tD000001\tD000002",
        ],
    )
    docs, stats = parse_pubtator_lines(lines, source="mem.txt")
    mentions = docs[0].mentions
    assert [m.ids for m in mentions] == [["OMIM:277900"], ["D001943", "D010051"], []]
    assert stats["unlinkable"] == 1 and stats["composite"] == 1 and stats["relation_lines"] == 1
    assert split_concept_ids("D014786|D006311") == ["D014786", "D006311"]  # BC5CDR composites
    assert split_concept_ids(" MESH:C012345 | OMIM:123456 ") == ["C012345", "OMIM:123456"]
    assert normalize_concept_id("613097") == normalize_concept_id("OMIM:613097") == "OMIM:613097"
    _, only = parse_pubtator_lines(lines, types=["Disease"])
    assert only["mentions"] == 1


def test_duplicate_document_is_read_once() -> None:
    s = _span("Wilson disease")
    entity = f"7\t{s[0]}\t{s[1]}\tWilson disease\tSpecificDisease\tD006527"
    docs, stats = parse_pubtator_lines(
        _doc("7", [entity]) + _doc("7", [entity]) + _doc("8", [entity.replace("7", "8", 1)])
    )
    assert [d.pmid for d in docs] == ["7", "8"]
    assert stats["entity_lines"] == 3 and stats["mentions"] == 2 and stats["duplicate_documents"] == 1


@pytest.mark.parametrize(
    "bad, line_no",
    [
        ("1\t0\t6\tWilson\tSpecificDisease", 3),  # 5 fields
        ("1\t0\t6\tWalrus\tSpecificDisease\tD1", 3),  # text mismatch at the offsets
        ("1\t0\t999\tWilson\tSpecificDisease\tD1", 3),  # offsets out of range
        ("2\t0\t6\tWilson\tSpecificDisease\tD1", 3),  # PMID of another document
        ("1\t0\t6\tWilson\tSpecificDisease\tD1++D2", 3),  # empty composite atom
        ("1|x|garbage", 3),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, bad: str, line_no: int) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(_doc("1", [bad])) + "\n", encoding="utf-8")
    with pytest.raises(PubTatorFormatError) as info:
        read_pubtator(path)
    assert f"{path}:{line_no}:" in str(info.value)
    assert info.value.line_number == line_no and isinstance(info.value, ValueError)


_pieces = st.sampled_from(
    ["1", "2", "0", "6", "12", "|t|", "|a|", "\t", "|", "+", "-1", "D001", "OMIM:1", "Wilson", " ", "x"]
)
_line = st.lists(_pieces, max_size=12).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_line, max_size=8), st.booleans())
def test_fuzz_parser_fails_only_with_located_format_error(lines: list[str], with_header: bool) -> None:
    if with_header:
        lines = ["1|t|Wilson disease", "1|a|x", *lines]
    try:
        parse_pubtator_lines(lines, source="fuzz.txt")
    except PubTatorFormatError as err:
        assert 1 <= err.line_number <= len(lines)
        assert str(err).startswith(f"fuzz.txt:{err.line_number}:")
