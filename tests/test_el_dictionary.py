"""Dictionary readers (MEDIC, MeSH TSV), name normalisation, candidate sets, TF-IDF retriever."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from hf_continual.tasks.entity_linking import (
    Dictionary,
    DictionaryFormatError,
    TfidfRetriever,
    iter_medic_entries,
    load_dictionary,
    normalize_name,
    read_pubtator,
)

DATA = Path(
    os.environ.get("HF_CONTINUAL_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)
needs_data = pytest.mark.skipif(
    not (DATA / "medic").is_dir(), reason=f"vocabulary data not found at {DATA} (set HF_CONTINUAL_DATA)"
)

TSV_HEADER = "ChemicalID\tChemicalName\tSynonyms\tTreeNumbers\tMappedDescriptors\tRecordType"


def test_normalize_name() -> None:
    assert normalize_name("  Type-2 Diabetes, Mellitus ") == "type 2 diabetes mellitus"
    assert normalize_name("Alzheimer's_disease (AD)") == "alzheimer s disease ad"
    assert normalize_name(normalize_name("Déjà-vu")) == normalize_name("Déjà-vu") == "déjà vu"


def test_medic_parsing_ids_and_names(tmp_path: Path) -> None:
    path = tmp_path / "medic.txt"
    path.write_text(
        "C567755|613097||Tooth Agenesis, Selective, 6|STHAG6\nD003920||Diabetes Mellitus|diabetes-mellitus\n",
        encoding="utf-8",
    )
    d = load_dictionary(path)
    assert d.name_ids[d.name_index["tooth agenesis selective 6"]] == ("C567755", "OMIM:613097")
    assert "OMIM:613097" in d and "613097" not in d
    assert d.names_of("D003920") == ["diabetes mellitus"]  # synonyms equal after normalisation merge
    assert len(d.entries) == 4 and len(d) == 3


def test_medic_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("D1||ok\n\nD2|no double bar\n", encoding="utf-8")
    with pytest.raises(DictionaryFormatError, match=rf"{path}:3:"):
        load_dictionary(path)
    with pytest.raises(DictionaryFormatError, match=r"x:1: concept without a name"):
        list(iter_medic_entries(["D1||"], source="x"))


def test_tsv_parsing_gz_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "chem.tsv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(f"{TSV_HEADER}\nMESH:D000082\tAcetaminophen\tParacetamol|APAP\tD02.1\t\tdescriptor\n")
        f.write("MESH:C012345\tFoo-bar\t\t\tMESH:D000082\tscr\n")
    d = load_dictionary(path)
    assert d.names_of("D000082") == ["acetaminophen", "paracetamol", "apap"]
    assert d.names_of("C012345") == ["foo bar"]
    bad = tmp_path / "bad.tsv"
    bad.write_text(f"{TSV_HEADER}\nMESH:D1\tName\tSyn\n", encoding="utf-8")
    with pytest.raises(DictionaryFormatError, match=rf"{bad}:2: expected 6"):
        load_dictionary(bad)


def test_candidate_set_keeps_all_gold_names_and_is_seeded() -> None:
    d = Dictionary([(f"name {i}", [f"D{i % 50}"]) for i in range(500)])
    a = d.candidate_set({"D1", "D2"}, num_other=30, seed=3)
    b = d.candidate_set({"D1", "D2"}, num_other=30, seed=3)
    assert a.names == b.names and len(a) == 20 + 30
    assert set(a.names_of("D1")) == set(d.names_of("D1")) and len(a.names_of("D1")) == 10


def test_tfidf_retriever_ranks_exact_name_first() -> None:
    names = ["myocardial infarction", "breast cancer", "ovarian cancer", "diabetes mellitus"]
    idx, scores = TfidfRetriever(names).topk(["breast cancers", "diabetes"], k=2)
    assert idx[0, 0] == 1 and idx[1, 0] == 3 and scores[0, 0] >= scores[0, 1]


@needs_data
def test_real_vocabularies_cover_gold_ids() -> None:
    medic = load_dictionary(DATA / "medic" / "medic_06Jul2012.txt")
    assert len(medic.entries) == 76237 and medic.num_ids == 14942
    gold = set()
    for split in ("NCBItrainset_corpus.txt", "NCBIdevelopset_corpus.txt", "NCBItestset_corpus.txt"):
        docs, _ = read_pubtator(DATA / "ncbi_disease" / split)
        gold.update(i for doc in docs for m in doc.mentions for i in m.ids)
    assert len(gold) == 751 and all(g in medic for g in gold)  # OMIM:nnn vs bare nnn reconciled


@needs_data
def test_real_chemical_vocabulary_reports_missing_gold_ids() -> None:
    chem = load_dictionary(DATA / "mesh_chemicals" / "mesh_chemicals.tsv.gz")
    assert len(chem.entries) == 567582 and chem.num_ids == 260827
    docs, _ = read_pubtator(DATA / "bc5cdr" / "CDR_TrainingSet.PubTator.txt", types=["Chemical"])
    gold = {i for doc in docs for m in doc.mentions for i in m.ids}
    assert (len(gold), sum(g in chem for g in gold)) == (664, 628)  # SOURCES.txt: train 628/664 ids covered


def test_augmented_adds_training_names_to_known_ids_only() -> None:
    base = Dictionary([("Breast cancer", ["MESH:D001943"]), ("Asthma", ["MESH:D001249"])], source="d")
    aug, counts = base.augmented(
        [
            ("breast carcinoma", ["MESH:D001943"]),  # new name of a known id
            ("Asthma", ["MESH:D001249"]),  # already a name
            ("unknown thing", ["MESH:D999999"]),  # id not in the dictionary: skipped
            ("BC", ["MESH:D001943", "MESH:D999999"]),  # only the known id is attached
        ]
    )
    assert counts == {"given": 4, "added": 3, "skipped": 1, "new_names": 2}
    assert set(aug.names_of("MESH:D001943")) == {"breast cancer", "breast carcinoma", "bc"}
    assert aug.name_ids[aug.name_index["bc"]] == ("MESH:D001943",)
    assert "MESH:D999999" not in aug and len(base) == 2  # the original is unchanged


def test_training_name_pairs_add_unambiguous_short_forms_only() -> None:
    """Augmentation adds every training query and the short form of an expanded mention, unless that short form
    carries several id sets in the training split (then it would make one name mean several concepts)."""
    from datasets import Dataset

    from hf_continual.tasks.entity_linking.tasks import training_name_pairs

    train = Dataset.from_dict(
        {
            "mention": ["CsA", "cyclosporin A", "T", "T", "CsA"],
            "query": ["cyclosporin A", "cyclosporin A", "testosterone", "triamcinolone", "CsA"],
            "ids": [["D016572"], ["D016572"], ["D013739"], ["D014221"], ["D016572"]],
        }
    )
    queries = [(q, ids) for q, ids in zip(train["query"], train["ids"])]
    assert training_name_pairs(train) == (queries, 0)  # off by default
    pairs, short = training_name_pairs(train, short_forms=True)
    assert pairs[:5] == queries
    assert pairs[5:] == [("CsA", ["D016572"])] and short == 1  # "T" has two senses: left out
