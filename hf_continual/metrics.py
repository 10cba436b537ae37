"""Continual-learning metrics from the accuracy matrix.

Convention (one place, used everywhere): ``R[i][j]`` is the score on task ``j`` after training task ``i``
(``i, j = 0..T-1``) and ``b[j]`` the score of the starting model on task ``j``.

* ACC        = mean_j R[T-1][j]
* BWT        = mean_{j<T-1} (R[T-1][j] - R[j][j])                       (backward transfer; < 0 means forgetting)
* FWT        = mean_{j>=1} (R[j-1][j] - b[j])                            (forward transfer)
* forgetting = mean_{j<T-1} (max_{l<T-1} R[l][j] - R[T-1][j])            (Chaudhry et al. 2018)
* forgetting reduction of a method = 1 - forgetting(method) / forgetting(plain sequential fine-tuning)

Metrics that average over an empty set (BWT/forgetting with T=1, FWT with T=1) are ``None``.

The same metrics are shipped as ``evaluate`` modules inside the package (``evaluate_modules/``; loaded by
path, offline): ``continual_metrics`` (this file's :func:`continual_metrics`) and ``entity_linking_accuracy``
(acc@k, :func:`hf_continual.tasks.entity_linking.evaluation.accuracy_at_k`). They call these functions, so
there is one implementation; see :func:`load_evaluate_module`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import evaluate

EVALUATE_MODULES_DIR = Path(__file__).resolve().parent / "evaluate_modules"
EVALUATE_MODULES = ("continual_metrics", "entity_linking_accuracy")

Matrix = Sequence[Sequence[float]]


def _check_matrix(R: Matrix, b: Sequence[float] | None = None) -> list[list[float]]:
    if len(R) == 0:
        raise ValueError("accuracy matrix R is empty: need at least one task")
    T = len(R)
    rows = []
    for i, row in enumerate(R):
        row = list(row)
        if len(row) != T:
            raise ValueError(
                f"accuracy matrix R must be square T x T with T={T} tasks, but row {i} has {len(row)} entries"
            )
        for j, v in enumerate(row):
            if v is None or not math.isfinite(float(v)):
                raise ValueError(f"accuracy matrix R[{i}][{j}] = {v!r} is not a finite number")
        rows.append([float(v) for v in row])
    if b is not None and len(b) != T:
        raise ValueError(f"initial scores b have {len(b)} entries but R has {T} tasks")
    return rows


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def average_accuracy(R: Matrix) -> float:
    """ACC: mean score over all tasks after the last task."""
    rows = _check_matrix(R)
    return sum(rows[-1]) / len(rows[-1])


def backward_transfer(R: Matrix) -> float | None:
    """BWT: mean change on earlier tasks between right after learning them and the end."""
    rows = _check_matrix(R)
    T = len(rows)
    return _mean([rows[T - 1][j] - rows[j][j] for j in range(T - 1)])


def forward_transfer(R: Matrix, b: Sequence[float]) -> float | None:
    """FWT: mean gain on task j, before training it, over the starting model's score b[j]."""
    rows = _check_matrix(R, b)
    T = len(rows)
    return _mean([rows[j - 1][j] - float(b[j]) for j in range(1, T)])


def forgetting(R: Matrix) -> float | None:
    """Chaudhry forgetting: mean drop from the best earlier score to the final score, over all but the last task."""
    rows = _check_matrix(R)
    T = len(rows)
    return _mean([max(rows[k][j] for k in range(T - 1)) - rows[T - 1][j] for j in range(T - 1)])


def forgetting_reduction(forgetting_method: float, forgetting_baseline: float) -> float:
    """1 - F(method)/F(plain fine-tuning); undefined (ValueError) when the baseline does not forget."""
    if forgetting_baseline <= 0:
        raise ValueError(
            f"forgetting reduction is undefined: the baseline forgetting is {forgetting_baseline:.6g} (<= 0)"
        )
    return 1.0 - forgetting_method / forgetting_baseline


def continual_metrics(R: Matrix, b: Sequence[float] | None = None) -> dict[str, float | None]:
    """All stream metrics: ``{"acc", "bwt", "fwt", "forgetting"}`` (``fwt`` is None without ``b``)."""
    return {
        "acc": average_accuracy(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R, b) if b is not None else None,
        "forgetting": forgetting(R),
    }


def evaluate_module_path(name: str) -> str:
    """Directory of a packaged ``evaluate`` module (``evaluate.load(path)`` works offline on it)."""
    if name not in EVALUATE_MODULES:
        raise ValueError(f"unknown evaluate module {name!r}; packaged: {', '.join(EVALUATE_MODULES)}")
    return str(EVALUATE_MODULES_DIR / name)


def load_evaluate_module(name: str) -> evaluate.EvaluationModule:
    """``evaluate.load`` of a packaged module, kept in memory (no cache files; one process computes alone)."""
    import evaluate

    return evaluate.load(evaluate_module_path(name), keep_in_memory=True)
