"""Entity-linking quality per task alone, with a leave-one-out ablation of the linker's ingredients.

Each task is trained alone from the packaged all-MiniLM-L6-v2 on its whole training split (``--epochs``, default 1; the
training settings of ``--recipe``: lr, batch, warmup) and evaluated on its whole test split, with acc@1/acc@5
on the default candidate set (all names of the gold ids of every split + 20,000 sampled names) and on the full
dictionary (MEDIC: 71,924 names; MeSH chemicals: 543,374 names, which take about 15 min to encode on 2 CPU cores,
so by default only the ``all`` and ``no_remining`` configurations are scored on it for the chemical task:
``--full-chemical``).

Configurations (``all`` minus one ingredient each):

- ``untouched`` / ``untouched_no_abbreviations``: the packaged model, no training;
- ``all``: abbreviations expanded (Schwartz-Hearst, same document), training mention names added to the
  searched dictionary, hard negatives re-mined from the model every third of an epoch (not after the last
  step: half of the 7 negatives dense from a pool of each example's 16 best TF-IDF names + 5,000 sampled
  names, the rest TF-IDF);
- ``no_abbreviations``, ``no_augmentation``, ``no_remining``: ``all`` without that ingredient;
- ``stream`` (not run by default): what the task streams train, abbreviations expanded and nothing else (the
  learning-rate searches for the stream recipes use it).

``s800-species`` is scored on the default candidate set only (its full vocabulary has 2.6M names).

Every (task, configuration) writes ``OUT/<task>/<config>.json`` and is not repeated when that file exists;
``OUT/summary.json``/``summary.md`` hold the table of every finished result in OUT. Usage:
``HF_HUB_OFFLINE=1 python bench/el_quality.py [--data-dir ../shared/data] [--tasks ...] [--configs ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIGS: dict[str, dict[str, bool]] = {
    "untouched_no_abbreviations": {"train": False, "abbrev": False, "augment": False, "remine": False},
    "untouched": {"train": False, "abbrev": True, "augment": False, "remine": False},
    "all": {"train": True, "abbrev": True, "augment": True, "remine": True},
    "no_abbreviations": {"train": True, "abbrev": False, "augment": True, "remine": True},
    "no_augmentation": {"train": True, "abbrev": True, "augment": False, "remine": True},
    "no_remining": {"train": True, "abbrev": True, "augment": True, "remine": False},
    # what the task streams train (recipes' task_options): abbreviations expanded, nothing else; lr searches
    "stream": {"train": True, "abbrev": True, "augment": False, "remine": False},
}
DEFAULT_CONFIGS = [c for c in CONFIGS if c != "stream"]
TASKS = ["ncbi-disease", "bc5cdr-disease", "bc5cdr-chemical", "s800-species"]
GOALS = {"ncbi-disease": 0.88, "bc5cdr-disease": 0.90, "bc5cdr-chemical": 0.92}
REMINES_PER_EPOCH = 2


def full_wanted(task: str, config: str, full_chemical: list[str]) -> bool:
    """Whether (task, config) is also scored on the full dictionary. The species vocabulary (2.6M names) never is
    here: encoding it is hours on a CPU (README "Species linking" gives the measured rate)."""
    if task == "s800-species":
        return False
    return task != "bc5cdr-chemical" or config in full_chemical


def run_one(
    task_name: str,
    config: str,
    recipe: Any,
    full: bool,
    out_file: Path,
    show_progress: bool,
    limits: dict[str, int | None],
    epochs: int = 1,
    split: str = "test",
    scale: float | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    import torch

    from hf_continual import ContinualTrainer
    from hf_continual.recipe import resolve_model_name
    from hf_continual.state import atomic_write_json
    from hf_continual.tasks.entity_linking import DualEncoderModel, build_entity_linking_task

    spec = CONFIGS[config]
    seed = int(recipe.training.get("seed", 0))
    torch.manual_seed(seed)
    model_kwargs = {} if scale is None else {"scale": scale}
    model = DualEncoderModel.from_base(resolve_model_name(recipe.model), **model_kwargs)
    tokenizer = model.get_tokenizer()
    t0 = time.perf_counter()
    options = {
        "split": split,
        "num_candidates": int(recipe.task_options.get("num_candidates", 8)),
        "augment_short_forms": bool(recipe.task_options.get("augment_short_forms", False))
        and spec["augment"],
        "eval_candidates": "both" if full else "default",
        "expand_abbreviations": spec["abbrev"],
        "augment_dictionary": spec["augment"],
        "seed": seed,
        "show_progress": show_progress,
        **limits,
    }
    if spec["remine"]:  # a fraction of an epoch: after each third of it
        options["remine_every_steps"] = 1 / (REMINES_PER_EPOCH + 1)
    task = build_entity_linking_task(task_name, recipe.data_dir, tokenizer, corpora=recipe.corpora, **options)
    build_s = time.perf_counter() - t0
    train_s = 0.0
    log: list[dict[str, Any]] = []
    if spec["train"]:
        scratch = tempfile.mkdtemp(prefix="el_quality-")
        args = recipe.config(
            continual_method="none",
            num_train_epochs=epochs,
            output_dir=scratch,
            save_strategy="no",
            disable_tqdm=not show_progress,
            report_to=[],
        )
        trainer = ContinualTrainer(
            model=model,
            args=args,
            train_dataset=task.train_dataset,
            data_collator=task.data_collator,
            callbacks=task.callbacks,
        )
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        log = [e for e in trainer.state.log_history if "loss" in e]
        shutil.rmtree(scratch, ignore_errors=True)
    t0 = time.perf_counter()
    if torch.cuda.is_available() and not recipe.training.get("use_cpu", False):
        model.to("cuda")  # an untrained configuration never went through a Trainer, which places the model
    model.eval()
    with torch.no_grad():
        metrics = task.evaluate(model)
    eval_s = time.perf_counter() - t0
    record = {
        "task": task_name,
        "config": config,
        "ingredients": spec,
        "metrics": metrics,
        "stats": task.stats,
        "remine_every_steps": task.stats["training"].get("remining", {}).get("every_steps"),
        "training_args": {
            k: recipe.training.get(k)
            for k in ("learning_rate", "per_device_train_batch_size", "warmup_steps")
        }
        | {"num_train_epochs": epochs, "seed": seed},
        "settings": settings_of(epochs, split, scale, overrides),
        "loss_log": log,
        "seconds": {"build": build_s, "train": train_s, "evaluate": eval_s},
    }
    atomic_write_json(out_file, record)
    return record


def settings_of(epochs: int, split: str, scale: float | None, overrides: list[str] | None) -> dict[str, Any]:
    """What, beyond (task, configuration), defines a result: a cached file is reused only when these match."""
    return {"epochs": epochs, "split": split, "scale": scale, "overrides": sorted(overrides or [])}


class SettingsMismatch(ValueError):
    """A result file in OUT was made with other settings than this run's (one OUT holds one setting)."""


def load_record(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The finished result at ``path``; :class:`SettingsMismatch` when it was made with other settings (an
    untouched model's result holds for any number of epochs)."""
    record = json.loads(path.read_text())
    done = record.get("settings") or settings_of(
        record["training_args"]["num_train_epochs"], "test", None, []
    )
    wanted = settings if record["ingredients"]["train"] else settings | {"epochs": done["epochs"]}
    if done != wanted:
        raise SettingsMismatch(f"{path} was made with {done}, not {wanted}: use another --out")
    return record


def finished_records(out: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Every finished (task, configuration) in ``out``, in table order, whichever run wrote it: the summary is
    the whole folder, so a run over one task does not drop the others' rows."""
    return [
        load_record(path, settings)
        for task in TASKS
        for config in CONFIGS
        if (path := out / task / f"{config}.json").exists()
    ]


def fmt(metrics: dict[str, float], key: str) -> str:
    return f"{100 * metrics[key]:.1f}" if key in metrics else "-"


def with_id(metrics: dict[str, float], prefix: str = "full/") -> str:
    """acc@1 over the mentions that have a gold id (CUI-less ``-1`` mentions left out, as the published linkers'
    preprocessing does; ids missing from the dictionary still count as errors)."""
    if f"{prefix}correct@1" not in metrics:
        return "-"
    n = metrics[f"{prefix}mentions"] - metrics[f"{prefix}unlinkable"]
    return f"{100 * metrics[f'{prefix}correct@1'] / n:.1f}" if n else "-"


def summarize(out: Path, records: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    from hf_continual.state import atomic_write_json, atomic_write_text
    from hf_continual.tasks.entity_linking import TASK_REGISTRY

    models = [o.split("=", 1)[1] for o in settings["overrides"] or [] if o.startswith("model=")]
    start = f"`{models[-1]}`" if models else "the packaged MiniLM"
    lines = [
        f"acc@1 / acc@5 x100 on the whole {settings['split']} split of each task, trained alone ({settings['epochs']}"
        f" epoch{'s' if settings['epochs'] > 1 else ''}) from {start}"
        + (f"; scale {settings['scale']}" if settings["scale"] is not None else "")
        + (f"; recipe overrides: {', '.join(settings['overrides'])}" if settings["overrides"] else "")
        + ".",
        "default = all names of the gold ids of every split + 20,000 sampled names; full = the whole dictionary.",
        "Mentions without a gold id (-1) and gold ids missing from the dictionary count as errors, except in the "
        "'mentions with a gold id' column, which leaves the former out (the published linkers' protocol).",
        "",
        "| task | configuration | default acc@1 | default acc@5 | full acc@1 | full acc@5 | goal (full acc@1) | "
        "full acc@1, mentions with a gold id | train s | mentions | without gold id | gold not in dictionary |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        m = r["metrics"]
        goal = GOALS.get(r["task"])
        reached = ""
        if (
            goal is not None and "full/acc@1" in m and r["ingredients"]["train"]
        ):  # the goal is for a trained linker
            reached = " met" if m["full/acc@1"] >= goal else " not met"
        entity = r["stats"].get("entity_type") or getattr(TASK_REGISTRY.get(r["task"]), "entity_type", None)
        lines.append(
            f"| {r['task']}{f' ({entity})' if entity else ''} | {r['config']} | {fmt(m, 'acc@1')} | {fmt(m, 'acc@5')} | {fmt(m, 'full/acc@1')} | "
            f"{fmt(m, 'full/acc@5')} | {'-' if goal is None else f'{100 * goal:.0f}'}{reached} | {with_id(m)} | {r['seconds']['train']:.0f} | "
            f"{int(m['mentions'])} | {int(m['unlinkable'])} | "
            f"{int(m.get('full/not_in_dictionary', m['not_in_dictionary']))} |"
        )
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    atomic_write_json(
        out / "summary.json",
        {
            "rows": [
                {"task": r["task"], "config": r["config"], "metrics": r["metrics"], "seconds": r["seconds"]}
                for r in records
            ],
            "goals": GOALS,
            "settings": settings,
        },
    )
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/el_stream.yaml")
    ap.add_argument("--data-dir", default=None, help="corpora directory (default: the recipe's)")
    ap.add_argument("--out", default="bench/results/el_quality")
    ap.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    ap.add_argument(
        "--full-chemical",
        nargs="*",
        default=["all", "no_remining"],
        choices=list(CONFIGS),
        help="configurations scored on the full MeSH vocabulary for bc5cdr-chemical (about 15 min each)",
    )
    ap.add_argument("--epochs", type=int, default=1, help="training epochs (use another --out per value)")
    ap.add_argument(
        "--split", default="test", choices=["test", "dev"], help="evaluated split (dev for searches)"
    )
    ap.add_argument(
        "--scale",
        type=float,
        default=None,
        help="cosine scale of the dual encoder (default: the recipe's, else 20)",
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override, e.g. training.learning_rate=2e-4 or task_options.num_candidates=16",
    )
    ap.add_argument("--no-full", action="store_true", help="score the default candidate set only (searches)")
    ap.add_argument("--max-train-mentions", type=int, default=None, help="subsample (quick checks only)")
    ap.add_argument("--max-eval-mentions", type=int, default=None, help="subsample (quick checks only)")
    ap.add_argument("--progress", action="store_true", help="show progress bars")
    ap.add_argument("--only-finished", action="store_true", help="run nothing; summarise what is on disk")
    ns = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hf_continual.recipe import load_recipe

    data_override = [f"data_dir={ns.data_dir}"] if ns.data_dir else []
    recipe = load_recipe(ns.recipe, overrides=data_override + ns.overrides)
    scale = ns.scale if ns.scale is not None else recipe.scale
    settings = settings_of(ns.epochs, ns.split, scale, ns.overrides)
    out = Path(ns.out)
    for task_name in ns.tasks:
        for config in ns.configs:
            out_file = out / task_name / f"{config}.json"
            if out_file.exists():
                try:
                    load_record(out_file, settings)
                except SettingsMismatch as e:
                    sys.exit(str(e))
                continue
            if ns.only_finished:
                print(f"missing: {out_file}")
                continue
            print(f"\n=== {task_name} {config}", flush=True)
            full = not ns.no_full and full_wanted(task_name, config, ns.full_chemical)
            limits = {"max_train_mentions": ns.max_train_mentions, "max_eval_mentions": ns.max_eval_mentions}
            rec = run_one(
                task_name,
                config,
                recipe,
                full,
                out_file,
                ns.progress,
                limits,
                ns.epochs,
                ns.split,
                scale,
                ns.overrides,
            )
            m = rec["metrics"]
            print(
                f"--- {task_name} {config}: acc@1 {fmt(m, 'acc@1')} full {fmt(m, 'full/acc@1')} "
                f"({rec['seconds']})",
                flush=True,
            )
    try:
        records = finished_records(out, settings)
    except SettingsMismatch as e:
        sys.exit(str(e))
    if records:
        summarize(out, records, settings)


if __name__ == "__main__":
    main()
