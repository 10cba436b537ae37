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


def _first_task_penalties(result) -> list[float]:
    """The logged penalty values of the stream's first task (its Trainer log history is the first task's only
    when the stream has one task)."""
    return [h["continual_penalty"] for h in result.trainer.state.log_history if "continual_penalty" in h]


def test_a_stream_started_from_a_saved_state_protects_that_state_from_its_first_task(tmp_path):
    """``initial_state`` (a pretrained model's task 0): the state is loaded before the first task, so the first
    task already trains under its penalty (a plain start has no penalty on its first task) and the state's task
    is listed ahead of the stream's. A resumed stream expects those tasks ahead of its own; the same progress
    resumed without the initial state is refused. (Checked by breaking it: not loading the state fails the
    penalty and tasks_seen assertions.)"""
    import torch
    from transformers import BertForSequenceClassification

    from hf_continual.state import has_state

    tasks = toy_stream(n_train=64, n_eval=16)
    log = {"logging_strategy": "steps", "logging_steps": 1, "num_train_epochs": 2}
    run_stream(tiny_bert(0), tasks[:1], toy_config(str(tmp_path / "zero"), "kfac"), save_final_model=True)
    published = tmp_path / "zero" / "final"
    assert has_state(published)

    def start():
        return BertForSequenceClassification.from_pretrained(published)

    plain = run_stream(start(), tasks[1:2], toy_config(str(tmp_path / "plain"), "kfac", **log))
    assert not _first_task_penalties(plain) or max(_first_task_penalties(plain)) == 0
    seeded = run_stream(
        start(), tasks[1:2], toy_config(str(tmp_path / "seeded"), "kfac", **log), initial_state=published
    )
    penalties = _first_task_penalties(seeded)
    assert penalties and max(penalties) > 0
    assert seeded.trainer.method.tasks_seen == ["toy-a", "toy-not-a"]

    # resume: a 2-task stream from the state leaves its progress after task 1; running it again resumes there
    out = tmp_path / "resume"
    first = run_stream(start(), tasks[1:], toy_config(str(out), "kfac"), initial_state=published)
    again = run_stream(start(), tasks[1:], toy_config(str(out), "kfac"), initial_state=published, resume=True)
    assert again.trainer.method.tasks_seen == ["toy-a", "toy-not-a", "toy-b"]
    torch.testing.assert_close(  # same first row of R: it was read back, not recomputed from another model
        torch.tensor(again.accuracy_matrix[0]), torch.tensor(first.accuracy_matrix[0]), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="saved progress is for tasks"):
        run_stream(start(), tasks[1:], toy_config(str(out), "kfac"), resume=True)


def test_a_run_that_takes_a_shared_first_task_ends_as_if_it_had_trained_it(tmp_path):
    """``first_task_dir``: every registered method whose first task is plain fine-tuning (``plain_first_task``)
    loads the first task trained by another method's run and, after consolidating it itself, ends with the same R
    and the same weights as its own full run. The weights are compared to float32 tolerance (the shared weights
    come back exactly from safetensors and the same ops follow, but a BLAS may round in another order for other
    memory); R exactly: a score moves in steps of one held-out example, which rounding noise does not flip. A record
    with another key is not taken (and is replaced); FISH, whose first task is masked, neither takes nor writes
    one. (Checked by breaking it: consolidating the shared task with the donor's state, i.e. skipping end_task,
    fails the weight equality of ewc; a FISH declared plain fails it too.)"""
    import torch

    from hf_continual.methods import METHOD_REGISTRY
    from hf_continual.stream import FIRST_TASK_FILE

    tasks = toy_stream(n_train=16, n_eval=8)[:2]
    shared = tmp_path / "first"
    kw = {
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "fisher_num_samples": 8,
        "fish_num_samples": 8,
    }
    donor = run_stream(
        tiny_bert(0),
        tasks,
        toy_args(tmp_path / "donor", "kfac", **kw),
        first_task_dir=shared,
        first_task_key="k",
    )
    assert (shared / FIRST_TASK_FILE).is_file() and "first_task_from" not in donor.timings
    for method, cls in METHOD_REGISTRY.items():
        own = run_stream(tiny_bert(0), tasks, toy_args(tmp_path / "own", method, **kw))
        taken = run_stream(
            tiny_bert(0),
            tasks,
            toy_args(tmp_path / "taken", method, **kw),
            first_task_dir=shared,
            first_task_key="k",
        )
        assert ("first_task_from" in taken.timings) == cls.plain_first_task, method
        torch.testing.assert_close(taken.accuracy_matrix, own.accuracy_matrix, rtol=0, atol=0, msg=method)
        torch.testing.assert_close(taken.initial, own.initial, rtol=0, atol=0)
        for (name, a), b in zip(
            taken.trainer.model.state_dict().items(), own.trainer.model.state_dict().values()
        ):
            torch.testing.assert_close(a, b, msg=f"{method}: {name}")
        assert taken.trainer.method.tasks_seen == own.trainer.method.tasks_seen
    assert "fish" in METHOD_REGISTRY and not METHOD_REGISTRY["fish"].plain_first_task
    other = run_stream(
        tiny_bert(0),
        tasks[:1],
        toy_args(tmp_path / "other", "none", **kw),
        first_task_dir=shared,
        first_task_key="k2",
    )
    assert "first_task_from" not in other.timings
    assert json.loads((shared / FIRST_TASK_FILE).read_text())["key"] == "k2"
    with pytest.raises(ValueError, match="first_task_key"):
        run_stream(tiny_bert(0), tasks, toy_args(tmp_path / "nokey", "none"), first_task_dir=shared)
