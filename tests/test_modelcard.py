import pytest
from huggingface_hub import ModelCard

from hf_continual.metrics import continual_metrics
from hf_continual.modelcard import write_model_card
from hf_continual.stream import StreamResult, write_stream_outputs


@pytest.fixture
def results_dir(tmp_path):
    R = [[0.8, 0.3, 0.1], [0.6, 0.9, 0.2], [0.5, 0.7, 0.95]]
    b = [0.2, 0.25, 0.05]
    result = StreamResult(
        method="kfac",
        tasks=["ncbi-disease", "bc5cdr-disease", "bc5cdr-chemical"],
        accuracy_matrix=R,
        initial=b,
        metrics=continual_metrics(R, b),
        metric_name="acc@1",
        details={},
        timings={},
        config={
            "continual_method": "kfac",
            "continual_lambda": 100.0,
            "kfac_mode": "reduce",
            "learning_rate": 2e-5,
        },
        extra={
            "tasks_info": {
                "ncbi-disease": {
                    "description": "NCBI-disease linked to MEDIC 2012",
                    "training": {
                        "train_mentions": 500,
                        "examples": 298,
                        "remining": {
                            "every_steps": 7,
                            "remines": 2,
                            "dense_negatives": 4,
                            "sparse_negatives": 3,
                            "pool_names": 9000,
                        },
                    },
                    "test": {"mentions": 400},
                    "dev": {"mentions": 787},
                    "evaluated_split": "test",
                    "candidate_set": "default: all names of the 93 gold ids + 1000 other names (2539 names)",
                    "expand_abbreviations": True,
                    "full_candidate_set": "full dictionary (71924 names)",
                }
            }
        },
    )
    write_stream_outputs(result, tmp_path)
    return tmp_path, result


def test_card_parses_and_metrics_equal_results(results_dir):
    out, result = results_dir
    path = write_model_card(
        out, base_model="sentence-transformers/all-MiniLM-L6-v2", datasets=["ncbi_disease"]
    )
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert "continual-learning" in data["tags"] and "kfac" in data["tags"]
    assert data["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    values = {}
    for r in card.data.eval_results:
        values[(r.dataset_name, r.metric_type)] = r.metric_value
    for j, task in enumerate(result.tasks):
        assert values[(task, "acc@1")] == pytest.approx(result.accuracy_matrix[-1][j])
    stream = " -> ".join(result.tasks)
    for key in ("acc", "bwt", "fwt", "forgetting"):
        assert values[(stream, key)] == pytest.approx(result.metrics[key], abs=1e-6)
    text = card.text
    assert "| ncbi-disease | 80.0 | 30.0 | 10.0 |" in text
    assert "accuracy_matrix.png" in text and "continual_lambda" in text and "load_continual_state" in text

    # what the numbers were measured on
    assert (
        "- **ncbi-disease**: NCBI-disease linked to MEDIC 2012; 298 training examples from 500 mentions; "
        "evaluated on 400 test mentions; candidate set: default: all names of the 93 gold ids + 1000 other "
        "names (2539 names); abbreviations expanded: yes; hard negatives re-mined from the model every 7 steps "
        "(2 times; 4 dense + 3 TF-IDF negatives from a pool of 9000 names); also scored on the full dictionary "
        "(71924 names) (`full/` metrics in results.json)" in text
    )
    assert "- bc5cdr-disease" in text  # no info recorded: listed by name only


def test_card_and_tables_name_the_entity_type_of_each_task(tmp_path):
    """Each task is labelled with what it links, in training order (task list, matrix rows, model-index names,
    terminal summary); tasks without a recorded type keep their bare name. Fails when the labels are taken in
    another order than the stream's or the entity types are dropped from results.json."""
    from hf_continual.stream import load_results, summary_text, task_labels

    tasks = ["s800-species", "ncbi-disease", "toy"]
    R = [[0.7, 0.5, 0.1], [0.6, 0.9, 0.2], [0.5, 0.8, 0.9]]
    result = StreamResult(
        method="none",
        tasks=tasks,
        accuracy_matrix=R,
        initial=[0.1, 0.2, 0.3],
        metrics=continual_metrics(R, [0.1, 0.2, 0.3]),
        metric_name="acc@1",
        details={},
        timings={},
        config={"continual_method": "none"},
        entity_types={"ncbi-disease": "disease", "s800-species": "species"},
    )
    write_stream_outputs(result, tmp_path)
    saved = load_results(tmp_path)
    labels = ["s800-species (species)", "ncbi-disease (disease)", "toy"]
    assert task_labels(saved) == labels
    text = ModelCard.load(write_model_card(tmp_path)).text
    assert "1. s800-species (species)\n2. ncbi-disease (disease)\n3. toy" in text
    assert "| after \\ on | s800-species (species) | ncbi-disease (disease) | toy |" in text
    assert "| ncbi-disease (disease) | 60.0 | 90.0 | 20.0 |" in text
    names = [r.task_name for r in ModelCard.load(tmp_path / "README.md").data.eval_results[:3]]
    assert names == [f"{label} (after the last task)" for label in labels]
    assert summary_text(saved).splitlines()[1].split() == [
        "after",
        "\\",
        "on",
        *[w for x in labels for w in x.split()],
    ]
