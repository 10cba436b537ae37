"""The forgetting bench's aggregation (bench/forgetting.py): hand-computed figures on two made-up seeds."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_forgetting", ROOT / "bench" / "forgetting.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(seed: int, R: list[list[float]], initial: list[float], acc: float, forgetting: float) -> dict:
    return {
        "tasks": ["a", "b"],
        "accuracy_matrix": R,
        "initial": initial,
        "metrics": {"acc": acc, "bwt": -forgetting, "forgetting": forgetting},
        "timings": {
            "train_s": [1.0, 2.0],
            "consolidate_s": [0.5, 0.5],
            "evaluate_s": [1.0, 1.0],
            "state_bytes": [100, 300],
        },
        "extra": {"bench": {"seed": seed, "overrides": {"continual_method": "x"}}},
    }


def test_aggregate_reports_plasticity_drop_below_start_and_state_size() -> None:
    """Plasticity = mean of R[j][j]; drop below start = initial[j] - R[T-1][j] per task; state size = the
    final state's bytes; all averaged over seeds (hand-computed)."""
    bench = _bench()
    runs = [
        _run(0, [[0.8, 0.5], [0.7, 0.9]], [0.75, 0.4], 0.8, 0.1),
        _run(1, [[0.6, 0.5], [0.6, 0.7]], [0.75, 0.4], 0.65, 0.0),
    ]
    agg = bench.aggregate(runs)
    assert agg["plasticity"]["values"] == pytest.approx([0.85, 0.65])
    assert agg["plasticity"]["mean"] == pytest.approx(0.75)
    assert agg["drop_below_start"][0]["values"] == pytest.approx([0.05, 0.15])
    assert agg["drop_below_start"][1]["values"] == pytest.approx([-0.5, -0.3])
    assert agg["state_bytes"] == 300


def test_paired_difference_pairs_runs_by_seed_not_by_position() -> None:
    """a - b per common seed, the std of the differences (not of either method); a seed only one method ran is
    left out, and runs listed in another order are still paired by seed."""
    bench = _bench()
    a = [
        _run(0, [[1, 0], [1, 1]], [0, 0], 0.80, 0.02),
        _run(1, [[1, 0], [1, 1]], [0, 0], 0.70, 0.04),
        _run(2, [[1, 0], [1, 1]], [0, 0], 0.50, 0.50),
    ]
    b = [_run(1, [[1, 0], [1, 1]], [0, 0], 0.60, 0.10), _run(0, [[1, 0], [1, 1]], [0, 0], 0.78, 0.06)]
    diff = bench.paired_difference(a, b)
    assert diff["seeds"] == [0, 1]
    assert diff["acc"]["values"] == pytest.approx([0.02, 0.10])
    assert diff["forgetting"]["values"] == pytest.approx([-0.04, -0.06])
    assert diff["forgetting"]["std"] == pytest.approx(0.0141421356, rel=1e-6)
    assert bench.paired_difference(a, [_run(5, [[1, 0], [1, 1]], [0, 0], 0.5, 0.5)]) is None
