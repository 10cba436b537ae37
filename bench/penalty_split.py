"""Where the K-FAC and the diagonal (EWC) penalty differ: each one's price of plain fine-tuning's next-task update,
split by layer type.

Both curvatures are estimated, as the methods do at a task boundary (``end_task``, the recipe's Fisher settings),
on the first task of a recipe's stream at the model trained on it (``--model``: a directory with its weights, e.g.
the forgetting bench's shared first task ``OUT/runs/test/_first_task/seed0``). The second task is then trained
from there under plain fine-tuning (its seed as in a stream), and its update ``delta = theta_2 - theta_1`` -- the
step that makes plain fine-tuning forget -- is priced by each curvature, group by group: ``q_g = delta_g^T F
delta_g`` (both representations are block-diagonal across layers, so the groups add up to the whole). Printed and
written to ``--out`` (JSON + markdown): q per group, its share of the total, the stiffness ``q_g / |delta_g|^2``,
the K-FAC / diagonal ratio, and the penalty ``lambda/2 q`` at given lambdas next to the task loss.

Usage: ``HF_HUB_OFFLINE=1 python bench/penalty_split.py --model DIR [--recipe recipes/el_stream_species_full.yaml]
[--lambda ewc=1e7 --lambda kfac=1e5] [--out bench/results/forgetting_full/penalty_split]``
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: layer type of a parameter name (BERT naming); whole modules, so a K-FAC layer's weight and bias stay together
GROUPS: list[tuple[str, str]] = [
    ("embeddings", r"\.embeddings\.(word|position|token_type)_embeddings\."),
    ("LayerNorm", r"LayerNorm\."),
    ("attention query/key", r"\.attention\.self\.(query|key)\."),
    ("attention value", r"\.attention\.self\.value\."),
    ("attention output", r"\.attention\.output\.dense\."),
    ("FFN in", r"\.intermediate\.dense\."),
    ("FFN out", r"\.layer\.\d+\.output\.dense\."),
]


def group_of(name: str) -> str:
    """The layer type of parameter ``name`` (``other`` when no pattern matches, e.g. a pooler)."""
    for group, pattern in GROUPS:
        if re.search(pattern, name):
            return group
    return "other"


def split_quadratic(curvature: Any, delta: dict[str, Any]) -> dict[str, float]:
    """``delta_g^T F delta_g`` of ``curvature`` for every group g of ``delta``'s parameter names."""
    groups: dict[str, dict[str, Any]] = {}
    for n, d in delta.items():
        groups.setdefault(group_of(n), {})[n] = d
    return {g: float(curvature.quadratic(part)) for g, part in groups.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", required=True, help="weights after the stream's first task (model.safetensors)"
    )
    ap.add_argument("--recipe", default="recipes/el_stream_species_full.yaml")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--lambda", dest="lambdas", action="append", default=[], metavar="METHOD=VALUE")
    ap.add_argument("--out", default=None, help="folder for penalty_split.json and penalty_split.md")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    import torch
    from safetensors.torch import load_file

    from hf_continual.recipe import load_recipe, resolve_model_name
    from hf_continual.tasks.entity_linking import DualEncoderModel, build_entity_linking_task
    from hf_continual.trainer import ContinualTrainer

    weights = Path(args.model) / "model.safetensors"
    if not weights.is_file():
        raise SystemExit(f"--model {args.model}: no model.safetensors there")
    lambdas = {}
    for item in args.lambdas:
        method, sep, value = item.partition("=")
        if not sep or method not in ("ewc", "kfac"):
            raise SystemExit(f"--lambda {item!r}: expected ewc=VALUE or kfac=VALUE")
        lambdas[method] = float(value)
    recipe = load_recipe(args.recipe, overrides=[f"data_dir={args.data_dir}"] if args.data_dir else [])

    def model_at_first_task() -> Any:
        model = DualEncoderModel.from_base(
            resolve_model_name(recipe.model), num_hidden_layers=recipe.num_hidden_layers
        )
        model.load_state_dict(load_file(str(weights)), strict=True)
        return model

    tokenizer = model_at_first_task().get_tokenizer()
    # the curvatures and the update read only the training data: evaluate one mention (the candidate sets stay
    # as the recipe builds them; they do not enter here)
    options = {**recipe.task_options, "max_eval_mentions": 1, "show_progress": False}
    first, second = (
        build_entity_linking_task(n, recipe.data_dir, tokenizer, **options) for n in recipe.tasks[:2]
    )
    scratch = tempfile.mkdtemp(prefix="penalty_split_")

    def trainer_for(method: str, model: Any) -> ContinualTrainer:
        config = recipe.config(
            continual_method=method, output_dir=scratch, disable_tqdm=True, save_strategy="no"
        )
        return ContinualTrainer(
            model=model, args=config, train_dataset=first.train_dataset, data_collator=first.data_collator
        )

    anchor_model = model_at_first_task()
    curvatures, seconds = {}, {}
    for method in ("ewc", "kfac"):
        trainer = trainer_for(method, anchor_model)
        t0 = time.perf_counter()
        trainer.end_task(first.train_dataset, task_name=first.name)
        seconds[method] = time.perf_counter() - t0
        curvatures[method] = trainer.method.terms[0][1]
    anchor = {n: p.detach().clone() for n, p in anchor_model.named_parameters() if p.requires_grad}

    trainer = trainer_for("none", model_at_first_task())
    trainer.method.tasks_seen = [first.name]  # the second task's seed, as in a stream
    trainer.train_dataset = second.train_dataset
    trainer.data_collator = second.data_collator
    for callback in second.callbacks:
        trainer.add_callback(callback)
    t0 = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - t0
    moved = dict(trainer.model.named_parameters())
    delta = {n: (moved[n].detach() - a).float() for n, a in anchor.items()}

    q = {m: split_quadratic(c, delta) for m, c in curvatures.items()}
    sq = {}
    for n, d in delta.items():
        sq[group_of(n)] = sq.get(group_of(n), 0.0) + float(torch.dot(d.reshape(-1), d.reshape(-1)))
    groups = [g for g, _ in GROUPS if g in sq] + (["other"] if "other" in sq else [])
    total = {m: sum(q[m].values()) for m in q}
    rows = [
        {
            "group": g,
            "delta_sq": sq[g],
            **{f"{m}_q": q[m].get(g, 0.0) for m in q},
            **{f"{m}_share": q[m].get(g, 0.0) / total[m] for m in q},
            **{f"{m}_stiffness": q[m].get(g, 0.0) / sq[g] for m in q},
            "kfac_over_ewc": q["kfac"].get(g, 0.0) / q["ewc"][g] if q["ewc"].get(g) else None,
        }
        for g in groups
    ]
    summary = {
        "recipe": args.recipe,
        "model": str(args.model),
        "first_task": first.name,
        "second_task": second.name,
        "second_task_train_loss": out.training_loss,
        "second_task_train_s": train_s,
        "consolidate_s": seconds,
        "delta_sq": sum(sq.values()),
        "total_q": total,
        "penalty_at_lambda": {m: 0.5 * lam * total[m] for m, lam in lambdas.items()},
        "rows": rows,
        "fisher": {"num_samples": recipe.config().fisher_num_samples, "type": recipe.config().fisher_type},
    }
    lines = [
        f"Plain fine-tuning's update on {second.name} (from the model after {first.name}), priced by the two "
        f"curvatures of {first.name}: q = delta^T F delta per layer type.",
        "",
        "| layer type | |delta|^2 | diagonal q | share | K-FAC q | share | diagonal q/|delta|^2 | K-FAC q/|delta|^2 "
        "| K-FAC / diagonal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "n/a" if r["kfac_over_ewc"] is None else f"{r['kfac_over_ewc']:.3g}"
        lines.append(
            f"| {r['group']} | {r['delta_sq']:.3g} | {r['ewc_q']:.3g} | {100 * r['ewc_share']:.1f}% | {r['kfac_q']:.3g} "
            f"| {100 * r['kfac_share']:.1f}% | {r['ewc_stiffness']:.3g} | {r['kfac_stiffness']:.3g} | {ratio} |"
        )
    lines.append(
        f"| all | {summary['delta_sq']:.3g} | {total['ewc']:.3g} | 100% | {total['kfac']:.3g} | 100% | "
        f"{total['ewc'] / summary['delta_sq']:.3g} | {total['kfac'] / summary['delta_sq']:.3g} | "
        f"{total['kfac'] / total['ewc']:.3g} |"
    )
    if lambdas:
        lines += [
            "",
            "Penalty lambda/2 q of that update at the given lambdas, against the second task's mean training loss "
            f"({out.training_loss:.3f}): "
            + ", ".join(
                f"{m} (lambda {lam:g}) {summary['penalty_at_lambda'][m]:.3g}" for m, lam in lambdas.items()
            ),
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from hf_continual.state import atomic_write_json, atomic_write_text

        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "penalty_split.json", summary)
        atomic_write_text(folder / "penalty_split.md", text)


if __name__ == "__main__":
    main()
