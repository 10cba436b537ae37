"""Hub model card (README.md) for a model trained on a task stream.

The YAML metadata carries ``base_model``, ``datasets``, ``tags`` (continual-learning and the method) and a
``model-index`` with one result per task after the last task plus the stream metrics ACC/BWT/FWT/forgetting;
the body gives the task order, method and hyper-parameters, the accuracy matrix and how to continue training.
Every number comes from the stream's ``results.json``.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .report import matrix_markdown, metrics_markdown
from .state import atomic_write_text
from .stream import HEATMAP_FILE, load_results, task_labels

CARD_FILE = "README.md"
STREAM_METRICS = ("acc", "bwt", "fwt", "forgetting")


def _hyper_parameters(results: dict[str, Any]) -> dict[str, Any]:
    """The training fields of the card plus the continual fields the method uses (the method registry says
    which: ``ContinualMethod.used_fields``)."""
    from types import SimpleNamespace

    from .methods import METHOD_REGISTRY
    from .methods.base import continual_field_defaults

    cfg = results.get("config", {})
    method = results.get("method", cfg.get("continual_method"))
    keys = ["continual_method", "learning_rate", "num_train_epochs", "per_device_train_batch_size", "seed"]
    cls = METHOD_REGISTRY.get(method)
    if cls is not None:
        view = SimpleNamespace(**{**continual_field_defaults(), **cfg})
        keys += sorted(cls.used_fields(view) - {"continual_method"})
    return {k: cfg[k] for k in keys if k in cfg}


def _evaluation_data(results: dict[str, Any]) -> str:
    """One line per task: corpus, training examples, evaluated split and candidate set (from ``tasks_info``)."""
    info = (results.get("extra") or {}).get("tasks_info") or {}
    lines = []
    for task in results["tasks"]:
        t = info.get(task) or {}
        if not t:
            lines.append(f"- {task}")
            continue
        split = t.get("evaluated_split")
        parts = [t.get("description", task)]
        if t.get("entity_type"):
            parts.insert(0, f"links {t['entity_type']} mentions")
        training = t.get("training") or {}
        if "examples" in training:
            parts.append(
                f"{training['examples']} training examples from {training.get('train_mentions')} mentions"
            )
        if isinstance(t.get(split), dict) and "mentions" in t[split]:
            parts.append(f"evaluated on {t[split]['mentions']} {split} mentions")
        if t.get("candidate_set"):
            parts.append(f"candidate set: {t['candidate_set']}")
        if "expand_abbreviations" in t:
            parts.append(f"abbreviations expanded: {'yes' if t['expand_abbreviations'] else 'no'}")
        remining = training.get("remining")
        if remining:
            parts.append(
                f"hard negatives re-mined from the model every {remining.get('every_steps')} steps "
                f"({remining.get('remines')} times; {remining.get('dense_negatives')} dense + "
                f"{remining.get('sparse_negatives')} TF-IDF negatives from a pool of {remining.get('pool_names')} names)"
            )
        if t.get("full_candidate_set"):
            parts.append(f"also scored on the {t['full_candidate_set']} (`full/` metrics in results.json)")
        lines.append(f"- **{task}**: " + "; ".join(parts))
    return "\n".join(lines) if lines else "(not recorded)"


def build_model_card(
    results: dict[str, Any],
    model_name: str,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    task_descriptions: dict[str, str] | None = None,
    heatmap: str | None = HEATMAP_FILE,
    license: str | None = None,
    notes: str = "",
) -> ModelCard:
    """A :class:`huggingface_hub.ModelCard` from a stream's results dict (see :mod:`hf_continual.stream`).

    Without an ``accuracy_matrix`` (a model trained outside a stream, e.g. pushed from a Trainer) the card has
    the task order, method and hyper-parameters and how to continue, and no results sections.
    """
    tasks: list[str] = results["tasks"]
    R = results.get("accuracy_matrix") or []
    metric = results.get("metric", "score")
    method = results.get("method", "none")
    final = R[-1] if R else []
    labels = task_labels(results)  # in training order, with the entity type of each task
    eval_results = [
        EvalResult(
            task_type="continual-learning",
            task_name=f"{labels[j]} (after the last task)",
            dataset_type=task,
            dataset_name=task,
            dataset_split=(task_descriptions or {}).get(task, "test"),
            metric_type=metric,
            metric_name=metric,
            metric_value=round(float(final[j]), 6),
        )
        for j, task in enumerate(tasks)
        if j < len(final)
    ]
    stream_name = " -> ".join(tasks)
    for key in STREAM_METRICS:
        value = (results.get("metrics") or {}).get(key)
        if value is not None:
            eval_results.append(
                EvalResult(
                    task_type="continual-learning",
                    task_name="task stream",
                    dataset_type="task-stream",
                    dataset_name=stream_name,
                    metric_type=key,
                    metric_name=key.upper(),
                    metric_value=round(float(value), 6),
                )
            )
    data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        datasets=datasets or None,
        license=license,
        library_name="transformers",
        tags=["continual-learning", method, "hf_continual"],
        eval_results=eval_results or None,
    )
    data_lines = _evaluation_data(results)
    hp = _hyper_parameters(results)
    hp_lines = "\n".join(f"- `{k}`: {v}" for k, v in hp.items())
    image = f"\n![accuracy matrix]({heatmap})\n" if heatmap else ""
    results_sections = ""
    if R:
        results_sections = f"""## Accuracy matrix ({metric}, x100)

Row "after X" is the model right after training task X; column Y is the score on task Y. "(start)" is the
model before any task.

{matrix_markdown(labels, R, results.get("initial"))}
{image}
## Stream metrics (points)

ACC = mean final score; BWT = mean (final - right after learning) over earlier tasks; FWT = mean (score before
training a task - starting score); forgetting = mean (best earlier score - final score).

{metrics_markdown(results["metrics"])}
"""
    body = f"""
# {model_name}

Fine-tuned on a sequence of tasks with [hf_continual](https://pypi.org/project/hf-continual/) using the
continual method **{method}**{f", starting from `{base_model}`" if base_model else ""}.

## Task order

{os.linesep.join(f"{i + 1}. {t}" for i, t in enumerate(labels))}

## Method and hyper-parameters

{hp_lines}

## Training and evaluation data

{data_lines}

{results_sections}
## Continue training on a new task

The continual state (anchors, curvature, masks, task history) is saved beside the weights
(`continual_state.safetensors`, `continual_state.json`), so the earlier tasks stay protected without their data:

```python
from hf_continual import ContinualConfig, ContinualTrainer

trainer = ContinualTrainer(model=model, args=ContinualConfig(output_dir="next", continual_method="{method}"),
                           train_dataset=new_task_train)
trainer.load_continual_state("path/to/this/model")
trainer.train(); trainer.end_task(task_name="new-task")
trainer.save_model("next/final")
```
{notes}
"""
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body)


def write_model_card(
    output_dir: str | os.PathLike,
    results: dict[str, Any] | None = None,
    model_name: str | None = None,
    **kwargs: Any,
) -> str:
    """Write ``README.md`` into ``output_dir`` (atomically) from ``results`` or ``output_dir/results.json``.

    Copies the heatmap beside the card when it lives elsewhere. Returns the card's path.
    """
    output_dir = os.fspath(output_dir)
    if results is None:
        results = load_results(output_dir)
    heatmap_src = kwargs.pop("heatmap_source", None)
    if heatmap_src and os.path.exists(heatmap_src):
        dest = os.path.join(output_dir, HEATMAP_FILE)
        if os.path.abspath(heatmap_src) != os.path.abspath(dest):
            shutil.copyfile(heatmap_src, dest)
    has_heatmap = os.path.exists(os.path.join(output_dir, HEATMAP_FILE))
    card = build_model_card(
        results,
        model_name=model_name or os.path.basename(os.path.abspath(output_dir)),
        heatmap=HEATMAP_FILE if has_heatmap else None,
        **kwargs,
    )
    path = os.path.join(output_dir, CARD_FILE)
    atomic_write_text(path, str(card))
    return path
