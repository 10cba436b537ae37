"""Run a task stream: train task t, evaluate every task, fill R[t, :]; write results, heatmap and tables.

``R[i][j]`` is the score on task j after training task i; ``b[j]`` is the starting model's score on task j
(see :mod:`hf_continual.metrics`). Scores are fractions in [0, 1]; tables show points (x100).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.trainer_utils import get_last_checkpoint

from .config import ContinualConfig
from .metrics import load_evaluate_module
from .report import matrix_markdown, matrix_text, metrics_markdown, plot_heatmap
from .state import atomic_write_json, atomic_write_text
from .trainer import ContinualTrainer

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
HEATMAP_FILE = "accuracy_matrix.png"
TABLE_FILE = "accuracy_matrix.md"


@dataclass
class Task:
    """One task of a stream: its training data and how to score a model on it.

    ``evaluate(model) -> dict`` must hold ``primary_metric`` (a fraction in [0, 1]); other entries (acc@5,
    counts) are kept in ``results.json`` as details.
    """

    name: str
    train_dataset: Any
    evaluate: Callable[[torch.nn.Module], dict[str, float]]
    data_collator: Callable | None = None
    primary_metric: str = "accuracy"
    info: dict[str, Any] = field(default_factory=dict)
    #: Trainer callbacks active only while this task trains (e.g. re-mining its hard negatives)
    callbacks: list[Any] = field(default_factory=list)


@dataclass
class StreamResult:
    """What a stream run measured (the content of ``results.json``)."""

    method: str
    tasks: list[str]
    accuracy_matrix: list[list[float]]
    initial: list[float]
    metrics: dict[str, float | None]
    metric_name: str
    details: dict[str, Any]
    timings: dict[str, Any]
    config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    #: task name -> what it links, in words ("disease", "species"), from ``Task.info["entity_type"]`` where known
    entity_types: dict[str, str] = field(default_factory=dict)
    #: the trainer that ran the stream (continue training, save state, write a card); not serialised
    trainer: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "tasks": self.tasks,
            **({"entity_types": self.entity_types} if self.entity_types else {}),
            "metric": self.metric_name,
            "accuracy_matrix": self.accuracy_matrix,
            "initial": self.initial,
            "metrics": self.metrics,
            "details": self.details,
            "timings": self.timings,
            "config": self.config,
            **({"extra": self.extra} if self.extra else {}),
        }


def _score(task: Task, model: torch.nn.Module) -> tuple[float, dict[str, float]]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            result = dict(task.evaluate(model))
    finally:
        model.train(was_training)
    if task.primary_metric not in result:
        raise KeyError(
            f"task {task.name!r}: evaluate() returned {sorted(result)}, missing {task.primary_metric!r}"
        )
    return float(result[task.primary_metric]), result


def evaluate_all(tasks: Sequence[Task], model: torch.nn.Module) -> tuple[list[float], list[dict[str, float]]]:
    """Scores of ``model`` on every task (primary metric) and the full metric dicts."""
    scores, details = [], []
    for task in tasks:
        s, d = _score(task, model)
        scores.append(s)
        details.append(d)
    return scores, details


def run_stream(
    model: torch.nn.Module,
    tasks: Sequence[Task],
    args: ContinualConfig,
    output_dir: str | os.PathLike | None = None,
    extra: dict[str, Any] | None = None,
    save_final_model: bool = False,
    trainer_kwargs: dict[str, Any] | None = None,
    resume: bool = False,
    initial_state: str | os.PathLike | None = None,
    first_task_dir: str | os.PathLike | None = None,
    first_task_key: str | None = None,
) -> StreamResult:
    """Train ``tasks`` in order with ``args.continual_method``; evaluate all tasks before and after each task.

    Writes ``results.json``, ``accuracy_matrix.png`` and ``accuracy_matrix.md`` into ``output_dir`` (default
    ``args.output_dir``) on the main process only; every process returns the same result. Each task trains in
    ``output_dir/tasks/NN-name`` (its Trainer checkpoints go there) and, after each task, the model, its
    continual state and the rows of R so far are saved in ``output_dir/progress``. With ``resume=True`` a killed
    run continues from there: completed tasks are skipped and the interrupted task resumes from its last
    Trainer checkpoint, so it ends with the same R as an uninterrupted run.

    ``initial_state``: a directory holding a continual state (e.g. the alignment task 0 saved beside a pretrained
    model) loaded before the first task, so the stream's penalty also protects what that state describes.

    ``first_task_dir``: where runs that train the first task identically share it: the same start model, tasks,
    training arguments and seed (what ``first_task_key`` names: the caller says what "the same" is), under methods
    whose first task is plain fine-tuning (``ContinualMethod.plain_first_task``; not with ``initial_state``). A run
    that finds a record with its key there loads those weights and takes that first row of R (and the start row)
    instead of training and evaluating the task again, then consolidates it with its own method; it ends with the
    same R and weights as if it had trained the task itself (tested for every registered method). A run that
    trains the first task writes the record. Elsewhere the directory is ignored.
    """
    if not tasks:
        raise ValueError("run_stream needs at least one task")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    metric_names = {t.primary_metric for t in tasks}
    output_dir = os.fspath(output_dir or args.output_dir)
    trainer = ContinualTrainer(
        model=model,
        args=args,
        train_dataset=tasks[0].train_dataset,
        data_collator=tasks[0].data_collator,
        **(trainer_kwargs or {}),
    )
    progress_dir = os.path.join(output_dir, PROGRESS_DIR)
    before: list[str] = []  # tasks of the initial state, before this stream's
    if initial_state is not None:
        trainer.load_continual_state(initial_state)
        before = list(trainer.method.tasks_seen)
    progress = _load_progress(trainer, progress_dir, tasks, before) if resume else None
    share = first_task_dir is not None and initial_state is None and trainer.method.plain_first_task
    if share and not first_task_key:
        raise ValueError(
            "run_stream: first_task_dir needs first_task_key (what makes two first tasks the same)"
        )
    shared = (
        _load_first_task(trainer, first_task_dir, first_task_key, names) if share and not progress else None
    )
    if progress is None:
        R: list[list[float]] = []
        timings: dict[str, Any] = {"train_s": [], "consolidate_s": [], "evaluate_s": []}
        if shared is not None:  # the start row too was measured by the run that trained the first task
            initial, initial_details = shared["initial"], shared["initial_details"]
            timings.update(
                initial_evaluate_s=shared["initial_evaluate_s"], first_task_from=shared["written_by"]
            )
        else:
            t0 = time.perf_counter()
            initial, initial_details = evaluate_all(tasks, trainer.model)
            timings["initial_evaluate_s"] = time.perf_counter() - t0
        details: dict[str, Any] = {"initial": initial_details, "after": []}
    else:
        R, initial, details, timings = (
            progress["R"],
            progress["initial"],
            progress["details"],
            progress["timings"],
        )
    for i in range(len(R), len(tasks)):
        task = tasks[i]
        trainer.train_dataset = task.train_dataset
        if task.data_collator is not None:
            trainer.data_collator = task.data_collator
        taken = shared is not None and i == 0  # trained and evaluated by another run: its weights are loaded
        task_dir = os.path.join(output_dir, "tasks", f"{i:02d}-{task.name}")
        trainer.args.output_dir = task_dir
        checkpoint = get_last_checkpoint(task_dir) if resume and os.path.isdir(task_dir) else None
        t0 = time.perf_counter()
        callbacks = [] if taken else list(getattr(task, "callbacks", None) or [])
        for callback in callbacks:
            trainer.add_callback(callback)
        try:
            if not taken:
                trainer.train(resume_from_checkpoint=checkpoint)
        finally:
            for callback in callbacks:
                trainer.remove_callback(callback)
        timings["train_s"].append(shared["train_s"] if taken else time.perf_counter() - t0)
        t0 = time.perf_counter()
        trainer.end_task(task.train_dataset, task_name=task.name)
        timings["consolidate_s"].append(time.perf_counter() - t0)
        timings.setdefault("state_bytes", []).append(continual_state_bytes(trainer))
        if trainer.is_world_process_zero():
            _log_task_boundary(i, tasks, trainer, timings)
        t0 = time.perf_counter()
        if taken:
            row, row_details = shared["row"], shared["row_details"]
        else:
            row, row_details = evaluate_all(tasks, trainer.model)
        timings["evaluate_s"].append(shared["evaluate_s"] if taken else time.perf_counter() - t0)
        R.append(row)
        details["after"].append(row_details)
        if i == 0 and share and not taken:
            _save_first_task(
                trainer,
                first_task_dir,
                {
                    "key": first_task_key,
                    "tasks": names,
                    "row": row,
                    "row_details": row_details,
                    "initial": initial,
                    "initial_details": details["initial"],
                    "train_s": timings["train_s"][0],
                    "evaluate_s": timings["evaluate_s"][0],
                    "initial_evaluate_s": timings["initial_evaluate_s"],
                    "written_by": output_dir,
                },
            )
        if i + 1 < len(tasks):
            _save_progress(
                trainer, progress_dir, {"R": R, "initial": initial, "details": details, "timings": timings}
            )
    trainer.args.output_dir = output_dir
    result = StreamResult(
        method=args.continual_method,
        tasks=names,
        accuracy_matrix=R,
        initial=initial,
        metrics=load_evaluate_module("continual_metrics").compute(accuracy_matrix=R, initial=initial),
        metric_name=metric_names.pop() if len(metric_names) == 1 else "mixed",
        details=details,
        timings=timings,
        config=args.to_yaml_dict(),
        extra=dict(extra or {}),
        entity_types={t.name: t.info["entity_type"] for t in tasks if (t.info or {}).get("entity_type")},
    )
    if save_final_model:  # every rank calls it (a collective on sharded backends); only the main one writes
        trainer.save_model(os.path.join(output_dir, "final"))
    if trainer.is_world_process_zero():
        write_stream_outputs(result, output_dir)
    result.trainer = trainer
    return result


def continual_state_bytes(trainer: ContinualTrainer) -> int:
    """Bytes of the continual state as saved (curvature, anchors, masks, replay rows): what a published model
    carries beside its weights."""
    tensors, _ = trainer.continual_state()
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _log_task_boundary(
    i: int, tasks: Sequence[Task], trainer: ContinualTrainer, timings: dict[str, Any]
) -> None:
    """One INFO line per finished task: examples, optimizer steps, times, size of the continual state."""
    dataset = tasks[i].train_dataset
    examples = len(dataset) if hasattr(dataset, "__len__") else "?"
    nbytes = timings["state_bytes"][-1]
    logger.info(
        "task %d/%d %s: %s examples, %d steps, train %.1f s, consolidation %.1f s, continual state %d bytes "
        "(%.1f MB)",
        i + 1,
        len(tasks),
        tasks[i].name,
        examples,
        trainer.state.global_step,
        timings["train_s"][-1],
        timings["consolidate_s"][-1],
        nbytes,
        nbytes / 1e6,
    )


PROGRESS_DIR = "progress"
PROGRESS_FILE = "progress.json"


def _save_progress(trainer: ContinualTrainer, progress_dir: str, record: dict[str, Any]) -> None:
    """Model + continual state + rows of R so far; written beside the old copy, then swapped in."""
    _save_swapped(
        trainer, progress_dir, PROGRESS_FILE, record, tmp=progress_dir + ".tmp", old=progress_dir + ".old"
    )


def _save_swapped(
    trainer: ContinualTrainer,
    directory: str,
    filename: str,
    record: dict[str, Any],
    tmp: str,
    old: str,
    with_state: bool = True,
) -> None:
    """The model (with its continual state unless ``with_state`` is False) and ``record`` as ``filename``,
    written into ``tmp``, then swapped in for ``directory`` (its previous copy goes to ``old`` and is removed):
    a reader sees the old directory or the new one, never half of one."""
    if trainer.is_world_process_zero() and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(tmp, _internal_call=not with_state)  # the internal call writes no continual state
    if trainer.is_world_process_zero():
        atomic_write_json(os.path.join(tmp, filename), record)
        if os.path.isdir(directory):
            os.replace(directory, old)
        try:
            os.replace(tmp, directory)
        except OSError:  # another process swapped its own in meanwhile: keep that one
            shutil.rmtree(tmp)
        if os.path.isdir(old):
            shutil.rmtree(old)
    trainer.accelerator.wait_for_everyone()


FIRST_TASK_FILE = "first_task.json"


def _save_first_task(trainer: ContinualTrainer, directory: str | os.PathLike, record: dict[str, Any]) -> None:
    """The trained weights of the first task (not the method's state: each sharing run builds its own) and its
    record, written beside ``directory`` and swapped in; a record with the same key already there is kept."""
    directory = os.fspath(directory)
    if _read_first_task(directory, record["key"], record["tasks"]) is not None:
        return
    pid = os.getpid()  # several bench processes may write one seed's record at once
    _save_swapped(
        trainer, directory, FIRST_TASK_FILE, record, f"{directory}.tmp{pid}", f"{directory}.old{pid}", False
    )


def _read_first_task(directory: str, key: str | None, names: Sequence[str]) -> dict[str, Any] | None:
    path = os.path.join(directory, FIRST_TASK_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        record = json.load(fh)
    return record if record.get("key") == key and record.get("tasks") == list(names) else None


def _load_first_task(
    trainer: ContinualTrainer, directory: str | os.PathLike, key: str | None, names: Sequence[str]
) -> dict[str, Any] | None:
    """Restore the shared first task's weights into ``trainer.model``; its record, or None when there is no
    record with ``key`` for these tasks."""
    record = _read_first_task(os.fspath(directory), key, names)
    if record is not None:
        trainer._load_from_checkpoint(os.fspath(directory))
    return record


def _load_progress(
    trainer: ContinualTrainer, progress_dir: str, tasks: Sequence[Task], before: Sequence[str] = ()
) -> dict[str, Any] | None:
    """Restore model, continual state and R rows from ``progress_dir`` (None when there is nothing to resume);
    ``before``: the tasks of the initial state, which the saved state lists ahead of the stream's."""
    if not os.path.isfile(os.path.join(progress_dir, PROGRESS_FILE)):
        old = progress_dir + ".old"  # killed between the two renames of _save_progress
        if os.path.isfile(os.path.join(old, PROGRESS_FILE)):
            progress_dir = old
        else:
            return None
    with open(os.path.join(progress_dir, PROGRESS_FILE)) as fh:
        record = json.load(fh)
    done = len(record["R"])
    trainer._load_from_checkpoint(progress_dir)  # weights
    trainer.load_continual_state(progress_dir)  # then the continual state saved beside them
    seen = trainer.method.tasks_seen
    expected = [*before, *(t.name for t in tasks[:done])]
    if seen != expected:
        raise ValueError(
            f"{progress_dir}: saved progress is for tasks {seen}, not {expected} (the initial state's, then the "
            f"first {done} of this stream)"
        )
    trainer.method.restore_past_data([t.train_dataset for t in tasks[:done]])
    return record


def write_stream_outputs(result: StreamResult, output_dir: str | os.PathLike) -> None:
    """results.json, the heatmap PNG and the markdown table (each written atomically)."""
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_json(os.path.join(output_dir, RESULTS_FILE), result.to_dict())
    title = f"{result.method}: {result.metric_name}"
    plot_heatmap(
        task_labels(result.to_dict()),
        result.accuracy_matrix,
        os.path.join(output_dir, HEATMAP_FILE),
        title,
        result.metric_name,
        initial=result.initial,
    )
    table = (
        matrix_markdown(result.tasks, result.accuracy_matrix, result.initial)
        + "\n"
        + metrics_markdown(result.metrics)
    )
    atomic_write_text(os.path.join(output_dir, TABLE_FILE), table)


def task_labels(results: dict[str, Any]) -> list[str]:
    """The tasks of a results dict in training order, each with its entity type where known
    (``"s800-species (species)"``): the row and column labels of tables and heatmaps."""
    types = results.get("entity_types") or {}
    return [f"{t} ({types[t]})" if t in types else t for t in results["tasks"]]


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results.json (a directory holding one, or the file itself)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, RESULTS_FILE)
    with open(path) as fh:
        return json.load(fh)


def summary_text(result: StreamResult | dict[str, Any]) -> str:
    """Terminal summary: the matrix in points and the four metrics."""
    d = result.to_dict() if isinstance(result, StreamResult) else result
    m = d["metrics"]
    fmt = lambda v: "n/a" if v is None else f"{100 * v:+.2f}"  # noqa: E731
    return (
        f"method: {d['method']}   metric: {d['metric']} (x100)\n"
        + matrix_text(task_labels(d), d["accuracy_matrix"], d["initial"])
        + f"\nACC {100 * m['acc']:.2f}   BWT {fmt(m['bwt'])}   FWT {fmt(m['fwt'])}   forgetting {fmt(m['forgetting'])}"
    )
