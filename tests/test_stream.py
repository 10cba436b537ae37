import json
import os

import pytest

from hf_continual.metrics import continual_metrics
from hf_continual.stream import run_stream, summary_text
from hf_continual.toy import tiny_bert, toy_config, toy_stream


def toy_args(tmp_path, method, **kw):
    return toy_config(str(tmp_path / method), method, replay_per_task=64, **kw)


@pytest.fixture(scope="module")
def stream_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    return {m: run_stream(tiny_bert(0), toy_stream(), toy_args(tmp, m)) for m in ("none", "joint", "replay")}


def test_plain_finetuning_forgets_and_joint_does_not(stream_results):
    none, joint = stream_results["none"].metrics, stream_results["joint"].metrics
    assert none["bwt"] < -0.1
    assert joint["bwt"] > -0.02
    assert joint["acc"] > none["acc"] + 0.1
    assert stream_results["replay"].metrics["forgetting"] < none["forgetting"]


def test_results_file_matches_recomputed_metrics(stream_results):
    result = stream_results["none"]
    out = result.trainer.args.output_dir
    data = json.loads(open(f"{out}/results.json").read())
    assert data["tasks"] == ["toy-a", "toy-not-a", "toy-b"]
    assert len(data["accuracy_matrix"]) == 3 and all(len(r) == 3 for r in data["accuracy_matrix"])
    recomputed = continual_metrics(data["accuracy_matrix"], data["initial"])
    for key, value in recomputed.items():
        assert data["metrics"][key] == pytest.approx(value)
    assert data["config"]["continual_method"] == "none"
    assert len(data["timings"]["train_s"]) == 3
    assert os.path.getsize(os.path.join(out, "accuracy_matrix.png")) > 1000
    table = open(os.path.join(out, "accuracy_matrix.md")).read()
    assert "| toy-a |" in table and "ACC" in table
    assert "ACC" in summary_text(data)


def test_duplicate_task_names_rejected(tmp_path):
    tasks = toy_stream(n_train=8, n_eval=4)
    tasks[1].name = tasks[0].name
    with pytest.raises(ValueError, match="unique"):
        run_stream(tiny_bert(0), tasks, toy_args(tmp_path, "none"))
