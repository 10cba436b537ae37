"""hf-continual: run continual-learning task streams from YAML recipes.

Commands:
  run RECIPE.yaml   train the recipe's task stream with a continual method; writes results.json, the heatmap,
                    the markdown table, the final model with its continual state and a model card
  evaluate DIR      score a saved model on a recipe's tasks (acc@1/acc@5)
  card DIR          (re)write the model card README.md of an output directory from its results.json
  demo              the quick medical entity-linking stream: plain fine-tuning vs the best protection method
  pretrain RECIPE   self-alignment (SapBERT) pretraining of a BERT on vocabulary synonym pairs; writes a model
                    directory that `model:` in any recipe can name

Exit codes: 0 success; 1 the run failed; 2 bad command line or recipe (unknown key, missing data, unknown task).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEMO_RECIPE = "recipes/demo.yaml"
DEMO_METHODS = ("none", "kfac")
PACKAGED_BASE = "sentence-transformers/all-MiniLM-L6-v2"


def _base_model_name(model: str) -> str:
    return PACKAGED_BASE if model == "minilm" else model


def run_recipe(recipe, show_progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Run one recipe end to end; returns the results dict (also written to ``recipe.output_dir``).

    ``resume=True`` continues a killed run in the same output directory: finished tasks are skipped and the
    interrupted one goes on from its last Trainer checkpoint (see :func:`~hf_continual.stream.run_stream`).
    """
    from .modelcard import write_model_card
    from .recipe import build_stream
    from .stream import RESULTS_FILE, run_stream, write_stream_outputs

    model, tasks = build_stream(recipe, show_progress=show_progress)
    args = recipe.config(disable_tqdm=not show_progress)
    extra = {"recipe": recipe.resolved(), "tasks_info": {t.name: getattr(t, "info", {}) for t in tasks}}
    result = run_stream(
        model,
        tasks,
        args,
        output_dir=recipe.output_dir,
        extra=extra,
        save_final_model=recipe.save_model,
        resume=resume,
        initial_state=recipe.initial_state,
    )
    if result.trainer.is_world_process_zero():
        base = _base_model_name(recipe.model)
        write_model_card(
            recipe.output_dir,
            result.to_dict(),
            model_name=recipe.name,
            base_model=base,
            datasets=recipe.tasks,
        )
        if recipe.save_model:
            final = os.path.join(recipe.output_dir, "final")
            # the final model's card: same results, heatmap copied beside it
            write_model_card(
                final,
                result.to_dict(),
                model_name=recipe.name,
                base_model=base,
                datasets=recipe.tasks,
                heatmap_source=os.path.join(recipe.output_dir, "accuracy_matrix.png"),
            )
        write_stream_outputs(result, recipe.output_dir)
        print(f"wrote {os.path.join(recipe.output_dir, RESULTS_FILE)}", file=sys.stderr)
    return result.to_dict()


def _cmd_run(ns: argparse.Namespace) -> int:
    from .recipe import load_recipe
    from .stream import summary_text

    recipe = load_recipe(ns.recipe, overrides=ns.set, method=ns.method, output_dir=ns.output_dir)
    results = run_recipe(recipe, show_progress=not ns.no_progress, resume=ns.resume)
    print(summary_text(results))
    return 0


def _cmd_evaluate(ns: argparse.Namespace) -> int:
    from .recipe import build_stream, load_recipe
    from .state import atomic_write_json
    from .stream import evaluate_all
    from .tasks.entity_linking import DualEncoderModel

    recipe = load_recipe(ns.recipe, overrides=ns.set)
    if not os.path.isdir(ns.model_dir):
        raise FileNotFoundError(f"model directory {ns.model_dir!r} does not exist")
    _, tasks = build_stream(recipe, show_progress=not ns.no_progress)
    model = DualEncoderModel.from_pretrained(ns.model_dir)
    scores, details = evaluate_all(tasks, model)
    out = {"model": ns.model_dir, "tasks": [t.name for t in tasks], "scores": scores, "details": details}
    atomic_write_json(os.path.join(ns.model_dir, "evaluation.json"), out)
    for t, d in zip(tasks, details):
        print(f"{t.name:20s} " + "  ".join(f"{k} {v:.4f}" for k, v in d.items() if isinstance(v, float)))
    return 0


def _cmd_card(ns: argparse.Namespace) -> int:
    from .modelcard import write_model_card
    from .stream import load_results

    results = load_results(ns.output_dir)
    recipe = results.get("extra", {}).get("recipe", {})
    base = ns.base_model or (_base_model_name(recipe["model"]) if "model" in recipe else None)
    path = write_model_card(
        ns.output_dir,
        results,
        model_name=ns.model_name or recipe.get("name"),
        base_model=base,
        datasets=results.get("tasks"),
    )
    print(path)
    return 0


def _cmd_demo(ns: argparse.Namespace) -> int:
    from .recipe import load_recipe
    from .report import stream_reading
    from .state import atomic_write_json
    from .stream import summary_text

    summaries = {}
    t0 = time.perf_counter()
    for method in ns.methods:
        overrides = [f"data_dir={ns.data_dir}"] if ns.data_dir else []
        recipe = load_recipe(
            ns.recipe, overrides=overrides, method=method, output_dir=os.path.join(ns.output_dir, method)
        )
        results = run_recipe(recipe, show_progress=not ns.no_progress)
        summaries[method] = results
        print(summary_text(results), flush=True)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; outputs in {ns.output_dir}")
    print("\nReading (acc@1 x100 on the evaluated test mentions):\n" + stream_reading(summaries))
    if len(summaries) > 1:
        base = summaries[ns.methods[0]]["metrics"]["forgetting"]
        for m, r in summaries.items():
            f = r["metrics"]["forgetting"]
            red = (
                ""
                if not base or base <= 0 or f is None
                else f"  forgetting reduction vs {ns.methods[0]}: {100 * (1 - f / base):.1f}%"
            )
            print(
                f"{m:10s} ACC {100 * r['metrics']['acc']:.2f}  BWT {100 * r['metrics']['bwt']:+.2f}  "
                f"forgetting {100 * f:.2f}{red}"
            )
    atomic_write_json(
        os.path.join(ns.output_dir, "demo_summary.json"),
        {m: {"metrics": r["metrics"], "accuracy_matrix": r["accuracy_matrix"]} for m, r in summaries.items()},
    )
    return 0


def _cmd_pretrain(ns: argparse.Namespace) -> int:
    from .tasks.entity_linking.pretrain import (
        consolidate_alignment,
        json_summary,
        load_pretrain_recipe,
        pretrain,
    )

    recipe = load_pretrain_recipe(ns.recipe, overrides=ns.set, output_dir=ns.output_dir)
    if ns.consolidate:
        info = consolidate_alignment(recipe, recipe.output_dir)
        print(json.dumps({"output_dir": recipe.output_dir, "continual_state": info["continual_state"]}))
        return 0
    print(json_summary(pretrain(recipe, resume=ns.resume, show_progress=not ns.no_progress)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .recipe import CHECKPOINT_DEFAULTS

    parser = argparse.ArgumentParser(
        prog="hf-continual", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="train a recipe's task stream", description="Train a recipe's task stream."
    )
    run.add_argument("recipe", help="YAML recipe (see recipes/)")
    run.add_argument(
        "--method", help="continual method: none|ewc|online_ewc|kfac|fish|replay|joint (overrides the recipe)"
    )
    run.add_argument("--output-dir", help="output directory (overrides the recipe)")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value: bare keys are ContinualConfig fields (continual_lambda=100), dotted "
        "keys address a section (task_options.max_train_mentions=200); repeatable",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed run in the same output directory: finished tasks are kept, the interrupted "
        f"task goes on from its last checkpoint (recipes save one every {CHECKPOINT_DEFAULTS['save_steps']} "
        "steps unless training.save_steps/save_strategy say otherwise)",
    )
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.set_defaults(func=_cmd_run)

    ev = sub.add_parser("evaluate", help="score a saved model on a recipe's tasks")
    ev.add_argument("model_dir", help="a directory written by save_model / run (e.g. OUT/final)")
    ev.add_argument("--recipe", required=True, help="recipe whose tasks and options define the evaluation")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override recipe values")
    ev.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ev.set_defaults(func=_cmd_evaluate)

    card = sub.add_parser("card", help="write the model card README.md of an output directory")
    card.add_argument("output_dir", help="directory with results.json")
    card.add_argument("--model-name", help="title of the card (default: the recipe name)")
    card.add_argument("--base-model", help="base_model metadata (default: from the recipe)")
    card.set_defaults(func=_cmd_card)

    demo = sub.add_parser("demo", help="quick medical entity-linking stream: plain fine-tuning vs protection")
    demo.add_argument("--recipe", default=DEMO_RECIPE, help=f"recipe to run (default {DEMO_RECIPE})")
    demo.add_argument("--data-dir", default=None, help="corpora directory (default: the recipe's data_dir)")
    demo.add_argument(
        "--output-dir", default="outputs/demo", help="one sub-directory per method is written here"
    )
    demo.add_argument("--methods", nargs="+", default=list(DEMO_METHODS), help="methods to compare")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_cmd_demo)

    pre = sub.add_parser(
        "pretrain",
        help="self-alignment pretraining on vocabulary synonym pairs",
        description="SapBERT-style self-alignment of a BERT on synonym pairs of dictionaries (see "
        "hf_continual/tasks/entity_linking/pretrain.py for the recipe keys).",
    )
    pre.add_argument("recipe", help="pretraining recipe (e.g. recipes/pretrain_quick.yaml)")
    pre.add_argument("--output-dir", help="output directory (overrides the recipe)")
    pre.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value (training.save_steps=50)",
    )
    pre.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in OUTPUT/checkpoints"
    )
    pre.add_argument(
        "--consolidate",
        action="store_true",
        help="train nothing: write the recipe's continual_state into an already trained OUTPUT (a model trained "
        "on another machine whose state files stayed there)",
    )
    pre.add_argument("--no-progress", action="store_true", help="hide progress bars")
    pre.set_defaults(func=_cmd_pretrain)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Log records to the current ``sys.stderr`` (looked up at each record, so a replaced stderr is followed)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _log_to_stderr() -> None:
    """INFO lines of the package (task boundaries, ...) on stderr, once per process."""
    log = logging.getLogger("hf_continual")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s hf-continual: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    from .recipe import RecipeError

    ns = build_parser().parse_args(argv)
    _log_to_stderr()
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if getattr(ns, "no_progress", False):
        hf_logging.disable_progress_bar()  # the one switch of every progress bar (hf_continual.progress)
    try:
        return ns.func(ns)
    except RecipeError as err:
        print(f"hf-continual: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, RuntimeError) as err:
        print(f"hf-continual: {ns.command} failed: {err}", file=sys.stderr)
        return 1
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
