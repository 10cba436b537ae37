"""ContinualConfig: ``TrainingArguments`` plus the continual method and its hyper-parameters."""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any

import yaml
from transformers import TrainingArguments

from .methods.registry import METHOD_REGISTRY, method_names

#: the built-in method names (the registry is the one list: a method registered later is accepted too)
METHODS = method_names()
FISHER_TYPES = ("true", "empirical")
EWC_MODES = ("consolidated", "per_task")
KFAC_MODES = ("expand", "reduce")
KFAC_CROSS_TASK = ("merged", "per_task")
KFAC_COMPUTE_DTYPES = ("float32", "bfloat16")
FISH_SCOPES = ("global", "layer")
FISH_PENALTIES = ("none", "ewc", "kfac")


class _YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-4`` / ``5E+3`` as floats (YAML 1.1 needs a dot: ``1.0e-4``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(stream: Any) -> Any:
    """Parse YAML text or a file object with the project's loader (scientific notation = float)."""
    return yaml.load(stream, Loader=_YamlLoader)


def _plain(value: Any) -> Any:
    """Enums (``IntervalStrategy`` etc.) to their value, recursively inside lists and dicts."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass
class ContinualConfig(TrainingArguments):
    """Training arguments for continual fine-tuning.

    Every field of ``TrainingArguments`` is accepted; the fields below choose how earlier tasks are protected.
    The penalty methods add ``continual_lambda/2 * (theta - theta*)^T F (theta - theta*)`` with a diagonal (``ewc``,
    ``online_ewc``) or Kronecker-factored (``kfac``) Fisher F; ``fish`` updates only a sparse top-k Fisher mask;
    ``replay`` mixes stored examples of past tasks into training; ``joint`` trains on all tasks seen so far (upper
    reference); ``none`` is plain sequential fine-tuning.
    """

    continual_method: str = field(default="none", metadata={"help": f"One of {', '.join(METHODS)}."})
    continual_lambda: float = field(
        default=1e6,
        metadata={
            "help": "Penalty strength lambda (ewc, online_ewc, kfac, fish+penalty); >= 0. Default 1e6: the value the "
            "forgetting bench's dev search chose for both ewc and kfac on the medical stream (Fisher = mean over "
            "examples; the penalty gradient is added after gradient clipping)."
        },
    )
    fisher_type: str = field(
        default="true",
        metadata={
            "help": "'true': labels sampled from the model's predictive distribution; 'empirical': gold labels."
        },
    )
    fisher_num_samples: int | None = field(
        default=1024,
        metadata={"help": "Cap on the number of examples used to estimate the Fisher (None: all)."},
    )
    fisher_mc_samples: int = field(
        default=1, metadata={"help": "Monte Carlo label samples per example (true Fisher)."}
    )
    fisher_batch_size: int = field(default=16, metadata={"help": "Batch size of the Fisher estimation pass."})
    ewc_mode: str = field(
        default="consolidated",
        metadata={
            "help": "'consolidated': one anchor and the summed Fisher; 'per_task': one penalty per past task."
        },
    )
    online_ewc_gamma: float = field(
        default=1.0, metadata={"help": "online_ewc decay gamma in (0, 1]: F <- gamma * F + F_t."}
    )
    kfac_mode: str = field(default="reduce", metadata={"help": "K-FAC over tokens: 'expand' or 'reduce'."})
    kfac_damping: float = field(
        default=0.0, metadata={"help": "K-FAC factored Tikhonov damping gamma (>= 0)."}
    )
    kfac_cross_task: str = field(
        default="merged",
        metadata={"help": "'merged': A,G summed with decay; 'per_task': factors kept per task."},
    )
    kfac_compute_dtype: str = field(
        default="float32",
        metadata={
            "help": "K-FAC: dtype of the per-batch outer products, 'float32' or 'bfloat16' (faster on bf16 "
            "matmul units such as AMX / tensor cores; sums stay fp32)."
        },
    )
    kfac_rank: int | None = field(
        default=None,
        metadata={"help": "Keep this many eigenpairs per K-FAC factor (compact state); None: full."},
    )
    fish_keep_ratio: float = field(
        default=0.005, metadata={"help": "FISH: fraction of parameters updated, in (0, 1]."}
    )
    fish_num_samples: int = field(
        default=1024, metadata={"help": "FISH: examples used for the mask's Fisher."}
    )
    fish_scope: str = field(default="global", metadata={"help": "FISH: top-k 'global' or per 'layer'."})
    fish_trainable_modules: list[str] = field(
        default_factory=list,
        metadata={
            "help": "FISH: parameter-name substrings that are always fully trainable (e.g. new heads)."
        },
    )
    fish_protect: bool = field(
        default=False,
        metadata={"help": "FISH: rank by new-task Fisher relative to the consolidated old-task Fisher."},
    )
    fish_penalty: str = field(
        default="none", metadata={"help": "FISH combined with a penalty: 'none', 'ewc' or 'kfac'."}
    )
    replay_per_task: int = field(
        default=200, metadata={"help": "replay: number of stored examples kept per past task (>= 1)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate_continual()

    def _validate_continual(self) -> None:
        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported; choose one of: {', '.join(allowed)}")

        choice("continual_method", tuple(METHOD_REGISTRY))
        choice("fisher_type", FISHER_TYPES)
        choice("ewc_mode", EWC_MODES)
        choice("kfac_mode", KFAC_MODES)
        choice("kfac_cross_task", KFAC_CROSS_TASK)
        choice("fish_scope", FISH_SCOPES)
        choice("fish_penalty", FISH_PENALTIES)
        if not (self.continual_lambda >= 0):
            raise ValueError(f"continual_lambda must be >= 0, got {self.continual_lambda}")
        if not (0.0 < self.fish_keep_ratio <= 1.0):
            raise ValueError(f"fish_keep_ratio must be in (0, 1], got {self.fish_keep_ratio}")
        if not (0.0 < self.online_ewc_gamma <= 1.0):
            raise ValueError(f"online_ewc_gamma must be in (0, 1], got {self.online_ewc_gamma}")
        if self.fisher_num_samples is not None and self.fisher_num_samples < 1:
            raise ValueError(f"fisher_num_samples must be >= 1 or None, got {self.fisher_num_samples}")
        for name in ("fisher_mc_samples", "fisher_batch_size", "fish_num_samples", "replay_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kfac_damping < 0:
            raise ValueError(f"kfac_damping must be >= 0, got {self.kfac_damping}")
        if self.kfac_compute_dtype not in KFAC_COMPUTE_DTYPES:
            raise ValueError(
                f"kfac_compute_dtype must be one of {KFAC_COMPUTE_DTYPES}, got {self.kfac_compute_dtype!r}"
            )
        if self.kfac_rank is not None and self.kfac_rank < 1:
            raise ValueError(f"kfac_rank must be >= 1 or None, got {self.kfac_rank}")

    # ---- serialisation -------------------------------------------------------------------------------------
    def continual_dict(self) -> dict[str, Any]:
        """Only the continual fields (written into results, state and the model card)."""
        own = {f.name for f in dataclasses.fields(ContinualConfig)} - {
            f.name for f in dataclasses.fields(TrainingArguments)
        }
        return {name: getattr(self, name) for name in sorted(own)}

    def to_yaml_dict(self) -> dict[str, Any]:
        """Init fields with their current values, JSON/YAML-safe (enums as their value)."""
        out = {}
        for f in dataclasses.fields(self):
            if not f.init or f.name.startswith("_"):
                continue
            value = getattr(self, f.name)
            value = _plain(value)
            if isinstance(value, (str, int, float, bool, type(None), list, dict)):
                out[f.name] = value
        return out

    def to_yaml(self, path: str | os.PathLike) -> None:
        """Write the config as YAML atomically (temp file, then rename)."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".yaml")
        try:
            with os.fdopen(fd, "w") as fh:
                yaml.safe_dump(self.to_yaml_dict(), fh, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> ContinualConfig:
        """Build from a mapping; unknown keys are an error that names them and ``source``."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown ContinualConfig key(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> ContinualConfig:
        """Load a config written by ``to_yaml`` (or hand-written YAML with the same keys)."""
        with open(path) as fh:
            values = load_yaml(fh) or {}
        if not isinstance(values, dict):
            raise ValueError(
                f"{path}: expected a YAML mapping of ContinualConfig keys, got {type(values).__name__}"
            )
        return cls.from_dict(values, source=os.fspath(path))
