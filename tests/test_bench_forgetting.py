"""The forgetting bench's aggregation (bench/forgetting.py): hand-computed figures on two made-up seeds."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


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


def test_aggregate_reports_plasticity_own_gain_drop_below_start_and_state_size(script) -> None:
    """Plasticity = mean of R[j][j]; own-training gain = R[j][j] - R[j-1][j] per task; drop below start =
    initial[j] - R[T-1][j] per task; state size = the final state's bytes; over seeds (hand-computed)."""
    bench = script("bench/forgetting.py")
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
    # own-training gain: R[j][j] - R[j-1][j], the start score for task 0: seed 0 (0.05, 0.4), seed 1 (-0.15, 0.2)
    assert agg["own_gain"]["values"] == pytest.approx([0.225, 0.025])
    assert agg["own_gain_per_task"][0]["values"] == pytest.approx([0.05, -0.15])
    assert agg["own_gain_per_task"][1]["values"] == pytest.approx([0.4, 0.2])
    assert agg["first_task_shared"] == 0
    runs[1]["timings"]["first_task_from"] = "runs/test/none/seed1"
    assert bench.aggregate(runs)["first_task_shared"] == 1


def test_paired_difference_pairs_runs_by_seed_not_by_position(script) -> None:
    """a - b per common seed, the std of the differences (not of either method); a seed only one method ran is
    left out, and runs listed in another order are still paired by seed."""
    bench = script("bench/forgetting.py")
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
    assert diff["same_first_row"] == 2


def test_paired_difference_counts_the_seeds_whose_first_task_rows_differ(script) -> None:
    """A seed whose two runs scored differently after the first task (a first task trained twice, on different
    CPUs) is still paired, but not counted as sharing the first task."""
    bench = script("bench/forgetting.py")
    a = [
        _run(0, [[0.8, 0.5], [0.7, 0.9]], [0, 0], 0.8, 0.1),
        _run(1, [[0.6, 0.5], [0.6, 0.7]], [0, 0], 0.65, 0),
    ]
    b = [
        _run(0, [[0.8, 0.5], [0.6, 0.9]], [0, 0], 0.75, 0.2),
        _run(1, [[0.6, 0.4], [0.6, 0.7]], [0, 0], 0.6, 0),
    ]
    diff = bench.paired_difference(a, b)
    assert diff["seeds"] == [0, 1]
    assert diff["same_first_row"] == 1


def test_search_chooses_the_best_dev_acc_only_when_every_value_was_measured(script) -> None:
    """Highest dev ACC wins, a tie goes to the smaller value; a value still missing (not run, or running in
    another process) means nothing is chosen, rather than the best of the values that happen to be done."""
    bench = script("bench/forgetting.py")
    r = lambda acc: _run(0, [[1, 0], [1, 1]], [0, 0], acc, 0.0)  # noqa: E731
    assert bench.choose_value({1e5: r(0.80), 1e6: r(0.84), 1e7: r(0.83)}) == 1e6
    assert bench.choose_value({1e5: r(0.84), 1e6: r(0.84)}) == 1e5
    assert bench.choose_value({1e5: r(0.80), 1e6: None, 1e7: r(0.83)}) is None
    assert bench.choose_value({}) is None


def test_a_run_is_claimed_by_one_live_process_and_taken_over_from_a_dead_one(script, tmp_path: Path) -> None:
    """Two bench processes on one OUT never train the same run: the second claim is refused while the holder
    lives; a claim whose process is gone is taken over; releasing lets the next claim in."""
    bench = script("bench/forgetting.py")
    run_dir = tmp_path / "runs" / "test" / "none" / "seed0"
    lock = bench.claim_run(run_dir)
    assert lock is not None and lock.read_text() == str(os.getpid())
    assert bench.claim_run(run_dir) is None
    lock.unlink()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (run_dir / ".running").write_text(dead.stdout.strip())
    taken = bench.claim_run(run_dir)
    assert taken is not None and taken.read_text() == str(os.getpid())


def test_search_curve_is_drawn_only_when_a_method_was_searched(script, tmp_path: Path) -> None:
    """``search_curve.png`` plots forgetting against plasticity per searched value; with only none's reference
    row there is no curve to draw."""
    bench = script("bench/forgetting.py")
    run = _run(0, [[0.8, 0.5], [0.7, 0.9]], [0.75, 0.4], 0.8, 0.1)
    none_row = {"method": "none", "param": "-", "value": 0, "metrics": run["metrics"], "plasticity": 0.85}
    assert bench.plot_search_curve(tmp_path, [none_row]) is None
    rows = [none_row] + [
        {
            "method": "kfac",
            "param": "continual_lambda",
            "value": v,
            "metrics": run["metrics"],
            "plasticity": p,
        }
        for v, p in ((1e5, 0.84), (1e6, 0.83))
    ]
    path = bench.plot_search_curve(tmp_path, rows)
    assert path == tmp_path / "search_curve.png" and path.stat().st_size > 0
    assert bench.plasticity(run) == pytest.approx(0.85)


def test_a_run_finished_by_another_process_is_read_on_the_next_ask_and_no_longer_listed_missing(
    script,
    tmp_path: Path,
) -> None:
    """A search passes over values another process is running; when it asks again after its own runs, a value
    finished meanwhile is read from disk (not trained again) and leaves the list of missing runs."""
    import json
    from types import SimpleNamespace

    bench = script("bench/forgetting.py")
    recipe = SimpleNamespace(initial_state=None, resolved=lambda: {"training": {"learning_rate": 1e-4}})
    b = bench.Bench.__new__(bench.Bench)
    b.recipe, b.out, b.only_finished, b.missing, b.partial = recipe, tmp_path, False, {}, []
    run_dir = tmp_path / "runs" / "dev" / "kfac" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / ".running").write_text(str(os.getpid()))  # held by a live process (this one)
    overrides = {"continual_method": "kfac", "continual_lambda": 1e5}
    assert b.run("dev", "kfac", 0, overrides) is None
    assert b.missing == {"dev/kfac/seed0": "running in another process"}
    result = {
        "extra": {"bench": {"overrides": overrides}, "recipe": recipe.resolved()},
        "metrics": {"acc": 0.8},
    }
    (run_dir / "results.json").write_text(json.dumps(result))
    (run_dir / ".running").unlink()
    assert b.run("dev", "kfac", 0, overrides)["metrics"] == {"acc": 0.8}
    assert b.missing == {}


def test_stream_runs_of_one_seed_and_split_share_the_first_task_and_tasks_alone_do_not(
    script, tmp_path: Path
) -> None:
    """The shared first task (run_stream's first_task_dir) is keyed by split and seed under OUT/runs/<split> and
    by the recipe's budget; a task trained alone gets none (its evaluation is that task only)."""
    from types import SimpleNamespace

    bench = script("bench/forgetting.py")
    budget = {"training": {"learning_rate": 1e-4}}
    b = bench.Bench.__new__(bench.Bench)
    b.recipe, b.out = SimpleNamespace(initial_state=None, resolved=lambda: budget), tmp_path
    dev0 = b.first_task("dev", 0, None)
    assert dev0["first_task_dir"] == tmp_path / "runs" / "dev" / "_first_task" / "seed0"
    assert b.first_task("dev", 0, None) == dev0
    keys = {b.first_task(split, seed, None)["first_task_key"] for split in ("dev", "test") for seed in (0, 1)}
    assert len(keys) == 4
    budget["training"]["learning_rate"] = 2e-4
    assert b.first_task("dev", 0, None)["first_task_key"] != dev0["first_task_key"]
    assert b.first_task("dev", 0, 2) == {}


@pytest.mark.parametrize("method", ["ewc", "kfac"])
def test_penalty_split_groups_every_encoder_parameter_and_its_parts_add_up_to_the_whole(
    script, tmp_path: Path, method: str
) -> None:
    """bench/penalty_split.py: every encoder parameter of a BERT has a layer type (only the classifier head and
    pooler are 'other'), and the per-type quadratics of both curvatures add up to the whole ``delta^T F delta``
    (both are block-diagonal across layers; float32 sums in another order, hence rtol 1e-4). (Checked by
    breaking it: splitting a K-FAC layer's weight from its bias drops the cross terms and fails the sum.)"""
    import torch

    from hf_continual.toy import tiny_bert, toy_config, toy_stream
    from hf_continual.trainer import ContinualTrainer

    split = script("bench/penalty_split.py")
    model = tiny_bert(0)
    names = [n for n, _ in model.named_parameters()]
    assert {split.group_of(n) for n in names if ".encoder.layer." in n or ".embeddings." in n} == {
        g for g, _ in split.GROUPS
    }
    assert {n for n in names if split.group_of(n) == "other"} == {
        n for n in names if "pooler" in n or "classifier" in n
    }
    task = toy_stream(n_train=16, n_eval=4)[0]
    trainer = ContinualTrainer(
        model=model,
        args=toy_config(str(tmp_path), method, fisher_num_samples=16),
        train_dataset=task.train_dataset,
    )
    trainer.end_task(task.train_dataset, task_name=task.name)
    curvature = trainer.method.terms[0][1]
    g = torch.Generator().manual_seed(0)
    delta = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    parts = split.split_quadratic(curvature, delta)
    assert set(parts) == {split.group_of(n) for n in names}
    torch.testing.assert_close(
        torch.tensor(sum(parts.values()), dtype=torch.float64),
        curvature.quadratic(delta).double(),
        rtol=1e-4,
        atol=0,
    )


def test_summary_names_settings_fixed_with_chosen_instead_of_an_empty_search_table(
    script, tmp_path: Path
) -> None:
    """With every searched setting given by --chosen, summary.md says so (and shows no empty search table); with a
    search, its table is there."""
    bench = script("bench/forgetting.py")
    base = {"budget": "b", "tasks": ["a"], "methods": {}, "paired": {}, "alone": [], "missing_runs": []}
    fixed = {
        **base,
        "search": [],
        "fixed": {"ewc": {"continual_lambda": 1e7}, "fish": {"fish_penalty": "kfac"}},
    }
    bench.write_markdown(fixed, tmp_path / "fixed.md")
    text = (tmp_path / "fixed.md").read_text()
    assert "fixed with --chosen (ewc continual_lambda=1e+07; fish fish_penalty=kfac)" in text
    assert "Search (dev splits" not in text
    row = {"method": "none", "param": "-", "value": None, "metrics": {"acc": 0.8, "bwt": 0, "forgetting": 0}}
    bench.write_markdown({**base, "search": [{**row, "kept": True}]}, tmp_path / "searched.md")
    searched = (tmp_path / "searched.md").read_text()
    assert "Search (dev splits" in searched and "Not searched here" not in searched


def test_a_run_not_to_be_started_is_read_when_finished_and_neither_started_nor_owed_when_absent(
    script, tmp_path: Path
) -> None:
    """Bench.run(start=False) (a single-seed method's other seeds): a finished run with the same settings and
    budget is returned; an absent one, or one with other settings, is None without being run or listed as
    missing (nothing under its directory is created or removed)."""
    import json
    from types import SimpleNamespace

    bench = script("bench/forgetting.py")
    budget = {"training": {"learning_rate": 1e-4}}
    b = bench.Bench(SimpleNamespace(initial_state=None, resolved=lambda: budget), tmp_path, False)
    overrides = {"continual_method": "joint"}
    done = tmp_path / "runs" / "test" / "joint" / "seed1"
    done.mkdir(parents=True)
    record = {**_run(1, [[1, 0], [1, 1]], [0, 0], 0.8, 0.0), "extra": {"recipe": budget}}
    record["extra"]["bench"] = {"seed": 1, "overrides": overrides}
    (done / "results.json").write_text(json.dumps(record))
    assert b.run("test", "joint", 1, overrides, start=False)["metrics"]["acc"] == 0.8
    assert b.run("test", "joint", 2, overrides, start=False) is None
    assert not (tmp_path / "runs" / "test" / "joint" / "seed2").exists()
    assert b.run("test", "joint", 1, {"continual_method": "none"}, start=False) is None
    assert (done / "results.json").is_file()
    assert b.missing == {}
    b.only_finished = True  # a run the table owes: listed
    assert b.run("test", "joint", 2, overrides) is None
    assert list(b.missing) == ["test/joint/seed2"]


def test_cpu_info_names_the_model_and_the_vector_extensions_of_x86_and_arm(script, tmp_path, monkeypatch):
    """A run records where it ran (a first task retrained on another CPU differs): the model name, the CPU's
    identity (x86 family/model/stepping, ARM implementer/part) and the SIMD flags that change torch's kernels, from
    the first processor's block of /proc/cpuinfo, in SIMD_FLAGS order."""
    setup = script("bench/_setup.py")
    monkeypatch.setattr(setup.platform, "processor", lambda: "")
    x86 = tmp_path / "x86"
    x86.write_text(
        "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\nstepping\t: 1\n"
        "flags\t\t: fpu sse2 avx2 fma avx\n\n"
        "processor\t: 1\ncpu family\t: 23\nmodel\t\t: 49\nmodel name\t: other\nflags\t\t: avx512f\n"
    )
    assert setup.cpu_info(str(x86)) == {
        "processor": "AMD EPYC",
        "cpu_id": "family 25 model 17 stepping 1",
        "simd": ["avx", "avx2", "fma"],
    }
    arm = tmp_path / "arm"
    arm.write_text(
        "processor\t: 0\nFeatures\t: fp asimd sve\nCPU implementer\t: 0x41\nCPU part\t: 0xd0b\n\n"
        "Model\t\t: Raspberry Pi 5\n"
    )
    assert setup.cpu_info(str(arm)) == {
        "processor": "Raspberry Pi 5",
        "cpu_id": "implementer 0x41 part 0xd0b",
        "simd": ["asimd", "sve"],
    }
    assert setup.cpu_info(str(tmp_path / "absent")) == {"processor": "", "cpu_id": "", "simd": []}
