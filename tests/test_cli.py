"""The hf-continual command line: exit codes, messages, and a real run of the toy recipe."""

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from hf_continual.cli import build_parser, main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _recipe(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--method", "--output-dir", "--set", "--no-progress"):
        assert option in out
    assert {"run", "evaluate", "card", "demo"} <= set(build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize(
    "text, message",
    [
        ("tasks: [toy]\nlerning_rate: 1\n", "unknown recipe key(s): lerning_rate"),
        ("tasks: [toy]\ntraining: {continual_method: magic}\n", "continual_method='magic'"),
        ("tasks: [no-such-task]\n", "unknown task 'no-such-task'"),
        (
            "tasks: [ncbi-disease]\ndata_dir: /nonexistent/data\n",
            "data_dir '/nonexistent/data' does not exist",
        ),
        (
            "tasks: [ncbi-disease]\ntask_options: {max_mentions: 3}\n",
            "unknown task_options key(s): max_mentions",
        ),
        ("- just a list\n", "a recipe is a YAML mapping"),
        ("tasks: [toy]\nscale: -1\n", "'scale' must be a positive number"),
    ],
)
def test_bad_recipes_exit_2_with_a_clear_message(tmp_path, capsys, text, message):
    assert main(["run", _recipe(tmp_path, text)]) == 2
    assert message in capsys.readouterr().err


def test_missing_recipe_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def test_run_toy_recipe_writes_results_card_and_state(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "run",
            str(RECIPES / "toy.yaml"),
            "--method",
            "ewc",
            "--output-dir",
            str(out),
            "--set",
            "num_train_epochs=2",
            "--set",
            "continual_lambda=500",
            "--no-progress",
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "ewc" and results["config"]["continual_lambda"] == 500
    assert results["extra"]["recipe"]["tasks"] == ["toy"]
    assert results["tasks"] == ["toy-a", "toy-not-a", "toy-b"]
    card = ModelCard.load(out / "final" / "README.md")
    final_scores = {
        r.dataset_name: r.metric_value for r in card.data.eval_results if r.metric_type == "accuracy"
    }
    assert final_scores == pytest.approx(dict(zip(results["tasks"], results["accuracy_matrix"][-1])))
    assert (out / "final" / "continual_state.safetensors").is_file()
    assert (out / "final" / "accuracy_matrix.png").is_file()
    assert "ACC" in capsys.readouterr().out
    assert main(["card", str(out)]) == 0
    assert (out / "README.md").is_file()


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_recipe_loads_and_validates(path: Path) -> None:
    """The recipes in recipes/ parse, and their training and task sections are valid for this version (a GPU
    recipe's bf16 is switched off here: this machine has no bf16 device); pretraining recipes (``vocabularies``)
    through their own loader."""
    import yaml

    from hf_continual.recipe import load_recipe
    from hf_continual.tasks.entity_linking.pretrain import load_pretrain_recipe

    if "vocabularies" in yaml.safe_load(path.read_text()):
        recipe = load_pretrain_recipe(path)
        assert recipe.vocabularies and recipe.training_arguments().output_dir
        return
    gpu = yaml.safe_load(path.read_text()).get("training", {}).get("bf16", False)
    recipe = load_recipe(path, overrides=["bf16=false", "use_cpu=true"] if gpu else [])
    assert recipe.tasks and recipe.config().output_dir


def test_recipe_scale_reaches_the_dual_encoder(monkeypatch) -> None:
    """``scale`` (or ``--set scale=...``) sets the dual encoder's cosine scale; absent, the model default stays."""
    import hf_continual.tasks.entity_linking as el
    from hf_continual.recipe import build_stream, load_recipe

    recipe = load_recipe(RECIPES / "el_stream.yaml", overrides=["scale=30", "num_hidden_layers=1"])
    default = load_recipe(RECIPES / "el_stream.yaml", overrides=["num_hidden_layers=1"])
    monkeypatch.setattr(el, "build_entity_linking_task", lambda name, *a, **k: name)  # no data needed
    model, tasks = build_stream(recipe, show_progress=False)
    assert float(model.scale) == 30.0 and model.config.scale == 30.0 and recipe.resolved()["scale"] == 30.0
    assert tasks == recipe.tasks
    assert float(build_stream(default, show_progress=False)[0].scale) == 20.0
