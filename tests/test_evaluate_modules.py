"""The packaged `evaluate` modules: offline loading by path, hand-computed values, their cards, that the
wheel ships them, and that the stream and the retrieval evaluator compute through them.

Checked by breaking the code on purpose: swapping ``R[T-1][j] - R[j][j]`` in ``backward_transfer`` fails
the hand values; flattening id-list candidates to their first id in ``entity_linking_accuracy`` fails the
composite case; going back to the plain functions in the stream/evaluator fails the spy tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import hf_continual.metrics as metrics
from hf_continual.metrics import EVALUATE_MODULES, evaluate_module_path, load_evaluate_module

ROOT = Path(__file__).resolve().parents[1]

# R[i][j] after task i on task j, b the start; hand-computed metrics (3 tasks):
R3 = [[0.9, 0.2, 0.1], [0.6, 0.8, 0.3], [0.5, 0.7, 0.95]]
B3 = [0.1, 0.15, 0.05]
HAND3 = {
    "acc": (0.5 + 0.7 + 0.95) / 3,
    "bwt": ((0.5 - 0.9) + (0.7 - 0.8)) / 2,
    "fwt": ((0.2 - 0.15) + (0.3 - 0.05)) / 2,
    "forgetting": ((0.9 - 0.5) + (0.8 - 0.7)) / 2,
}
# float64 round trip through Arrow is exact; the tolerance covers only the order of the float sums
TOL = {"rtol": 0.0, "atol": 1e-12}


def _close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if value is None:
            assert actual[key] is None, key
        else:
            torch.testing.assert_close(float(actual[key]), float(value), **TOL, msg=key)


def test_modules_load_offline_by_path_in_a_fresh_process(tmp_path):
    """``evaluate.load(<path inside the package>)`` with the Hub offline and an empty modules cache."""
    script = textwrap.dedent(
        """
        import evaluate
        from hf_continual.metrics import evaluate_module_path
        m = evaluate.load(evaluate_module_path("continual_metrics"))
        print(m.compute(accuracy_matrix=[[0.75, 0.25], [0.5, 1.0]], initial=[0.0, 0.5]))
        a = evaluate.load(evaluate_module_path("entity_linking_accuracy"))
        print(a.compute(predictions=[["D1", "D2"], ["D3", "D2"]], references=[["D2"], ["D3"]], k=[1, 2]))
        """
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-2] == "{'acc': 0.75, 'bwt': -0.25, 'fwt': -0.25, 'forgetting': 0.25}"  # dyadic: exact
    assert lines[-1] == "{'acc@1': 0.5, 'correct@1': 1.0, 'acc@2': 1.0, 'correct@2': 2.0}"


def test_continual_metrics_module_hand_computed():
    module = load_evaluate_module("continual_metrics")
    _close(module.compute(accuracy_matrix=R3, initial=B3), HAND3)
    _close(module.compute(accuracy_matrix=R3), {**HAND3, "fwt": None})
    _close(
        module.compute(accuracy_matrix=[[0.4]], initial=[0.1]),
        {"acc": 0.4, "bwt": None, "fwt": None, "forgetting": None},
    )
    for row in R3:  # one row per task, as a stream would add them
        module.add(accuracy_matrix=row)
    _close(module.compute(initial=B3), HAND3)
    with pytest.raises(ValueError, match="square"):
        module.compute(accuracy_matrix=[[0.1, 0.2]])


def test_entity_linking_accuracy_module_hand_computed():
    """The same hand-built cases as the plain acc@k test, given as ranked id lists per mention."""
    module = load_evaluate_module("entity_linking_accuracy")
    predictions = [
        [["D1"], ["D1"], ["D2"]],  # gold D2: two synonyms of D1 take ONE rank -> rank 2
        [["D2"], ["D3"]],  # rank 1
        [["D1"], ["D3"], ["D4"], ["D5"], ["D6"], ["D2"]],  # rank 6 -> miss at 5
        [["D1"], ["D2", "D7"]],  # composite gold {D9, D7}: a name of {D2, D7} carries D7 -> rank 2
        [["D1"], ["D2"]],  # unlinkable: an error
    ]
    gold = [["D2"], ["D2"], ["D2"], ["D9", "D7"], []]
    out = module.compute(predictions=predictions, references=gold)
    _close(out, {"acc@1": 1 / 5, "correct@1": 1.0, "acc@5": 3 / 5, "correct@5": 3.0})
    # plain ids as candidates; k as a keyword
    flat = module.compute(
        predictions=[["D1", "D1", "D2"], ["D3", "D2"]], references=[["D2"], ["D3"]], k=[1, 2]
    )
    _close(flat, {"acc@1": 0.5, "correct@1": 1.0, "acc@2": 1.0, "correct@2": 2.0})


@pytest.mark.parametrize("name", EVALUATE_MODULES)
def test_module_cards_have_the_evaluate_header(name):
    from huggingface_hub import metadata_load

    card = Path(evaluate_module_path(name)) / "README.md"
    meta = metadata_load(card)
    assert meta["title"] and meta["description"]
    assert {"evaluate", "metric"} <= set(meta["tags"])
    text = card.read_text()
    for section in (
        "## Metric Description",
        "## How to Use",
        "### Inputs",
        "### Output Values",
        "## Citation",
    ):
        assert section in text, section
    assert (Path(evaluate_module_path(name)) / f"{name}.py").is_file()  # evaluate.load(dir) needs dir/dir.py


def test_unknown_module_name():
    with pytest.raises(ValueError, match="packaged: continual_metrics"):
        evaluate_module_path("accuracy")


def test_wheel_ships_the_modules(tmp_path):
    """Build the wheel from a copy of the sources (pyproject package-data) and look inside."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "hf_continual", src / "hf_continual", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=src,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in EVALUATE_MODULES:
        for file in (f"{name}.py", "README.md"):
            assert f"hf_continual/evaluate_modules/{name}/{file}" in names


def test_stream_metrics_come_from_the_module(tmp_path, monkeypatch):
    import hf_continual.stream as stream
    from hf_continual.toy import tiny_bert, toy_config, toy_stream

    calls = []

    def spy(name):
        calls.append(name)
        return load_evaluate_module(name)

    monkeypatch.setattr(stream, "load_evaluate_module", spy)
    tasks = toy_stream(n_train=8, n_eval=8)[:2]
    result = stream.run_stream(tiny_bert(0), tasks, toy_config(str(tmp_path), "none", num_train_epochs=1))
    assert calls == ["continual_metrics"]
    _close(result.metrics, metrics.continual_metrics(result.accuracy_matrix, result.initial))


def test_retrieval_evaluator_scores_through_the_module(monkeypatch):
    from hf_continual.tasks.entity_linking import Dictionary, RetrievalEvaluator, accuracy_at_k

    calls = []

    def spy(name):
        calls.append(name)
        return load_evaluate_module(name)

    monkeypatch.setattr(metrics, "load_evaluate_module", spy)
    dictionary = Dictionary([("fever", ["D1"]), ("pyrexia", ["D1"]), ("cough", ["D2", "D7"])])
    ev = RetrievalEvaluator(["fever", "coughing"], [["D1"], ["D7"]], dictionary, show_progress=False)
    ranked = [[0, 1, 2], [0, 1, 2]]
    out = ev._finish(ranked)
    assert calls == ["entity_linking_accuracy"]
    plain = accuracy_at_k(ranked, dictionary.name_ids, ev.gold, ev.ks)
    _close({k: out[k] for k in plain}, plain)
    assert out["acc@1"] == 0.5 and out["acc@5"] == 1.0
