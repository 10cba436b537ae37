"""The hf-continual command line: exit codes, messages, and a real run of the toy recipe."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from hf_continual.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


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
        # values of the wrong type: the file and the key are named
        (
            "tasks: [toy]\ntraining: {learning_rate: abc}\n",
            "r.yaml: training.learning_rate: expected float, got 'abc' (str)",
        ),
        ("tasks: [toy]\ntraining: {fp16: 1}\n", "r.yaml: training.fp16: expected bool, got 1 (int)"),
        (
            "tasks: [toy]\ntraining: {save_strategy: no}\n",
            "training.save_strategy: expected SaveStrategy or str",
        ),
        (
            "tasks: [toy]\ntask_options: {max_train_mentions: many}\n",
            "r.yaml: task_options.max_train_mentions: expected int or null, got 'many'",
        ),
        ("tasks: [toy]\ntask_options: {split: train}\n", "task_options.split: expected one of 'test', 'dev'"),
        ("tasks: [toy]\nsave_model: maybe\n", "r.yaml: save_model: expected bool, got 'maybe' (str)"),
    ],
)
def test_bad_recipes_exit_2_with_a_clear_message(tmp_path, capsys, text, message):
    assert main(["run", _recipe(tmp_path, text)]) == 2
    assert message in capsys.readouterr().err


def test_set_value_of_the_wrong_type_exits_2_naming_the_file_key_and_item(tmp_path, capsys):
    """(Before: ``learning_rate: abc`` reached torch's Adam and ended in a TypeError, exit 1.)"""
    recipe = _recipe(tmp_path, "tasks: [toy]\n")
    assert main(["run", recipe, "--set", "learning_rate=abc"]) == 2
    err = capsys.readouterr().err
    assert (
        "r.yaml: training.learning_rate: expected float, got 'abc' (str) (from --set learning_rate=abc)"
        in err
    )
    assert main(["run", recipe, "--set", "logging_strategy=no"]) == 2
    assert "quote the value" in capsys.readouterr().err


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
    captured = capsys.readouterr()
    assert "ACC" in captured.out
    # one log line per task boundary (examples, steps, times, continual state size)
    boundaries = [line for line in captured.err.splitlines() if "hf-continual: task " in line]
    assert len(boundaries) == 3 and "task 3/3 toy-b: 256 examples, 16 steps" in boundaries[-1]
    assert "continual state" in boundaries[-1]
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


KILL_RESUME_METHODS = ("ewc", "kfac", "fish")


def test_cli_resume_after_sigkill_mid_task_gives_the_same_stream(tmp_path):
    """``hf-continual run --resume`` after SIGKILL at step 25 of task 2 (checkpoint-20 on disk) ends with the
    same R and the same final weights as an uninterrupted run, for ewc, kfac and fish (FISH resumes with the
    task's mask and start values from the checkpoint). Fails when ``run_recipe`` drops ``resume`` (the run
    starts over and overwrites), when recipes stop saving checkpoints (no checkpoint-* to resume) or when a
    resumed task is not re-seeded like a fresh one (another data order: R and weights differ)."""
    from safetensors.torch import load_file

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",  # every run reduces floats in the same order
    }
    script = ROOT / "tests" / "dist" / "kill_resume.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), ",".join(KILL_RESUME_METHODS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    for method in KILL_RESUME_METHODS:
        assert status[f"plain/{method}"] == 0, proc.stderr[-3000:]
        assert status[f"kill/{method}"] == "SIGKILL", proc.stderr[-3000:]
        assert status[f"resume/{method}"] == 0, proc.stderr[-3000:]
        # after the kill: the rows of R of task 1 saved, task 2's checkpoint written, no results yet
        assert status[f"after_kill/{method}"] == {
            "progress": True,
            "checkpoints": ["checkpoint-20"],
            "results": False,
        }
        # the resumed run trained task 2 from step 20 and task 3 from scratch, not task 1
        assert status[f"resume_starts/{method}"] == [20, 0]
    for method in KILL_RESUME_METHODS:
        full = json.loads((tmp_path / "plain" / method / "results.json").read_text())
        resumed = json.loads((tmp_path / "killed" / method / "results.json").read_text())
        # R entries are multiples of 1/128 (128 held-out examples per toy task): within half a step means the
        # same counts
        torch.testing.assert_close(
            torch.tensor(resumed["accuracy_matrix"]),
            torch.tensor(full["accuracy_matrix"]),
            rtol=0,
            atol=0.5 / 128,
            msg=method,
        )
        a = load_file(tmp_path / "plain" / method / "final" / "model.safetensors")
        b = load_file(tmp_path / "killed" / method / "final" / "model.safetensors")
        assert a.keys() == b.keys()
        for name in a:  # same ops, same data order, restored RNG: only float summation order may differ
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=f"{method} {name}")


def test_recipe_initial_state_is_checked_before_anything_runs(tmp_path, capsys) -> None:
    """``initial_state`` must name a directory holding a continual state saved by the recipe's method: a missing
    state and a K-FAC state under an EWC recipe exit 2 naming the file and both methods; a matching one loads
    (resolved relative to the recipe file)."""
    from hf_continual.recipe import load_recipe
    from hf_continual.state import save_state

    assert main(["run", _recipe(tmp_path, "tasks: [toy]\ninitial_state: nowhere\n")]) == 2
    assert "initial_state 'nowhere'" in capsys.readouterr().err
    state = tmp_path / "aligned"
    state.mkdir()
    save_state(state, {}, {"method": "kfac", "tasks_seen": ["self-alignment"]})
    text = "tasks: [toy]\ninitial_state: aligned\ntraining: {continual_method: ewc}\n"
    assert main(["run", _recipe(tmp_path, text)]) == 2
    assert "saved by method 'kfac', but training.continual_method is 'ewc'" in capsys.readouterr().err
    recipe = load_recipe(
        _recipe(tmp_path, "tasks: [toy]\ninitial_state: aligned\ntraining: {continual_method: kfac}\n")
    )
    assert (
        recipe.initial_state == str(state.resolve())
        and recipe.resolved()["initial_state"] == recipe.initial_state
    )
